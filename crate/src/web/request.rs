//! A generation request as the page sends it, translated into the library's [`Job`].
use serde::Deserialize;
use wasm_bindgen::prelude::*;

use super::js_err;
use crate::pipeline::image_processor::Image8;
use crate::pipeline::img2img::{self, Img2Img};
use crate::pipeline::inpaint::{self, Inpaint};
use crate::pipeline::resize::ResizeMode;
use crate::pipeline::upscale::{self, Upscale};
use crate::pipeline::{Job, Mode, Request};
use crate::schedulers::SchedulerKind;

/// Settings as the page sends them; absent fields take the model's (or the mode's) defaults.
#[derive(Deserialize)]
pub(super) struct WebRequest {
    #[serde(default)]
    mode: WebMode,
    prompt: String,
    #[serde(default)]
    negative_prompt: String,
    steps: Option<usize>,
    guidance: Option<f64>,
    scheduler: Option<String>,
    width: Option<usize>,
    height: Option<usize>,
    seed: u64,
    /// The init image (img2img, inpaint) or the low-resolution one (upscale).
    image: Option<WebImage>,
    mask: Option<WebImage>,
    strength: Option<f64>,
    /// How the image is fitted to the output size: `just`, `crop` or `fill` (A1111's modes).
    resize_mode: Option<String>,
    #[serde(default)]
    mask_blur: f32,
    noise_level: Option<usize>,
}

impl WebRequest {
    pub(super) fn into_job(self) -> Result<Job, JsError> {
        let resize = self.resize_mode.as_deref().map(ResizeMode::from_name).transpose().map_err(js_err)?.unwrap_or_default();
        let mode = match self.mode {
            WebMode::Txt2img => Mode::TextToImage,
            WebMode::Img2img => Mode::ImageToImage(Img2Img {
                image: WebImage::required(self.image, "init image")?,
                resize,
                strength: self.strength.unwrap_or(img2img::DEFAULT_STRENGTH),
                encode_noise: None,
            }),
            WebMode::Inpaint => Mode::Inpaint(Inpaint {
                image: WebImage::required(self.image, "init image")?,
                mask: WebImage::required(self.mask, "mask")?,
                resize,
                mask_blur: self.mask_blur,
                strength: self.strength.unwrap_or(inpaint::DEFAULT_STRENGTH),
                image_noise: None,
                masked_image_noise: None,
            }),
            WebMode::Upscale => Mode::Upscale(Upscale {
                image: WebImage::required(self.image, "image")?,
                noise_level: self.noise_level.unwrap_or(upscale::DEFAULT_NOISE_LEVEL),
                tiles: Some(upscale::DEFAULT_TILES),
                low_res_noise: None,
            }),
        };
        let request = Request {
            prompt: self.prompt,
            negative_prompt: self.negative_prompt,
            steps: self.steps,
            guidance: self.guidance,
            scheduler: self.scheduler.as_deref().map(SchedulerKind::from_name).transpose().map_err(js_err)?,
            width: self.width,
            height: self.height,
            seed: Some(self.seed),
            latents: None,
            step_noise: None,
        };
        Ok(Job { request, mode })
    }
}

/// Which pipeline [`super::model::Model::start`] runs, as the page names it.
#[derive(Deserialize, Default)]
#[serde(rename_all = "lowercase")]
enum WebMode {
    #[default]
    Txt2img,
    Img2img,
    Inpaint,
    Upscale,
}

/// An image from the page: a PNG file's bytes, decoded exactly as the CLI decodes files, or a
/// canvas's RGBA pixels (alpha dropped, as for PNGs).
#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum WebImage {
    Png(#[serde(with = "serde_wasm_bindgen::preserve")] js_sys::Uint8Array),
    Rgba {
        width: usize,
        height: usize,
        #[serde(with = "serde_wasm_bindgen::preserve")]
        pixels: js_sys::Uint8Array,
    },
}

impl WebImage {
    /// The image a mode needs; `what` names it in errors.
    fn required(image: Option<WebImage>, what: &str) -> Result<Image8, JsError> {
        match image.ok_or_else(|| js_err(format!("no {what} was given")))? {
            WebImage::Png(bytes) => Image8::decode_png(&bytes.to_vec()).map_err(|e| js_err(format!("the {what}: {e}"))),
            WebImage::Rgba { width, height, pixels } => {
                let rgba = pixels.to_vec();
                if rgba.len() != width * height * 4 {
                    return Err(js_err(format!("the {what} has {} bytes, not {width}x{height} RGBA pixels", rgba.len())));
                }
                let pixels = rgba.chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect();
                Ok(Image8 { width, height, channels: 3, pixels })
            }
        }
    }
}
