//! What the page and the engine hand each other: a generation request, what a loaded model and
//! a started run report. Plain serde types, so the wasm module (`web/`) only converts them at its
//! edge; their TypeScript (`web/src/generated/`) is written from these by ts-rs when the unit
//! tests run, so the page never restates them.
use serde::{Deserialize, Serialize};
#[cfg(test)]
use ts_rs::TS;

use crate::error::{Error, Result};
use crate::pipeline::image_processor::Image8;
use crate::pipeline::img2img::{self, Img2Img};
use crate::pipeline::inpaint::{self, Inpaint};
use crate::pipeline::resize::ResizeMode;
use crate::npy;
use crate::pipeline::upscale::{self, ImageLatents, Upscale};
use crate::pipeline::{Job, Mode, Request};
use crate::schedulers::SchedulerKind;

/// Settings as the page sends them; absent fields take the model's (or the mode's) defaults.
#[derive(Deserialize)]
#[cfg_attr(test, derive(TS), ts(export, optional_fields))]
pub struct GenerateRequest {
    pub mode: ModeName,
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    /// As the engine names schedulers (`Layout::schedulers`).
    pub scheduler: Option<String>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    #[cfg_attr(test, ts(as = "f64"))]
    pub seed: u64,
    /// The init image (image to image, inpaint) or the low-resolution one (upscale).
    pub image: Option<ImageInput>,
    /// Inpainting: white is repainted, black kept; the image's size.
    pub mask: Option<ImageInput>,
    pub strength: Option<f64>,
    /// How the image is fitted to width × height: the engine's names (`Layout::resize_modes`).
    pub resize_mode: Option<String>,
    pub mask_blur: Option<f32>,
    pub noise_level: Option<usize>,
    /// Upscale: the image's latents as a run left them before decoding (`Finished::latents`),
    /// which the latent upscaler takes instead of encoding the image.
    pub image_latents: Option<Latents>,
}

/// Latents as a run left them before decoding, and the scaling factor of its VAE.
#[derive(Deserialize, Serialize)]
#[cfg_attr(test, derive(TS), ts(export))]
pub struct Latents {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
    pub scaling_factor: f64,
}

/// A finished run: its PNG, and its latents before decoding (to upscale in latent space).
#[derive(Serialize)]
#[cfg_attr(test, derive(TS), ts(export))]
pub struct Finished {
    #[serde(with = "serde_bytes")]
    #[cfg_attr(test, ts(type = "Uint8Array"))]
    pub png: Vec<u8>,
    pub latents: Latents,
}

/// Which pipeline runs, as the page (and its share links) name it.
#[derive(Clone, Copy, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(test, derive(TS), ts(export, rename = "Mode"))]
pub enum ModeName {
    Txt2img,
    Img2img,
    Inpaint,
    Upscale,
}

impl ModeName {
    /// In the order the page lists them.
    pub const ALL: [Self; 4] = [Self::Txt2img, Self::Img2img, Self::Inpaint, Self::Upscale];
}

/// An image for the engine: a PNG file's own bytes, decoded exactly as the CLI decodes files,
/// or a canvas's RGBA pixels (alpha dropped, as for PNGs).
#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(test, derive(TS), ts(export))]
pub enum ImageInput {
    Png(#[serde(with = "serde_bytes")] #[cfg_attr(test, ts(type = "Uint8Array"))] Vec<u8>),
    Rgba {
        width: usize,
        height: usize,
        #[serde(with = "serde_bytes")]
        #[cfg_attr(test, ts(type = "Uint8Array"))]
        pixels: Vec<u8>,
    },
}

impl GenerateRequest {
    /// The library's job for these settings.
    pub fn into_job(self) -> Result<Job> {
        let resize = self.resize_mode.as_deref().map(ResizeMode::from_name).transpose()?.unwrap_or_default();
        let mode = match self.mode {
            ModeName::Txt2img => Mode::TextToImage,
            ModeName::Img2img => Mode::ImageToImage(Img2Img {
                image: ImageInput::required(self.image, "init image")?,
                resize,
                strength: self.strength.unwrap_or(img2img::DEFAULT_STRENGTH),
                encode_noise: None,
            }),
            ModeName::Inpaint => Mode::Inpaint(Inpaint {
                image: ImageInput::required(self.image, "init image")?,
                mask: ImageInput::required(self.mask, "mask")?,
                resize,
                mask_blur: self.mask_blur.unwrap_or(0.0),
                strength: self.strength.unwrap_or(inpaint::DEFAULT_STRENGTH),
                image_noise: None,
                masked_image_noise: None,
            }),
            ModeName::Upscale => Mode::Upscale(Upscale {
                image: ImageInput::required(self.image, "image")?,
                noise_level: self.noise_level,
                tiles: Some(upscale::DEFAULT_TILES),
                low_res_noise: None,
                latents: self.image_latents.map(|l| ImageLatents { latents: npy::Array { shape: l.shape, values: l.values }, scaling_factor: Some(l.scaling_factor) }),
            }),
        };
        let request = Request {
            prompt: self.prompt,
            negative_prompt: self.negative_prompt.unwrap_or_default(),
            steps: self.steps,
            guidance: self.guidance,
            scheduler: self.scheduler.as_deref().map(SchedulerKind::from_name).transpose()?,
            width: self.width,
            height: self.height,
            seed: Some(self.seed),
            latents: None,
            step_noise: None,
        };
        Ok(Job { request, mode })
    }
}

impl ImageInput {
    /// The image a mode needs; `what` names it in errors.
    fn required(image: Option<ImageInput>, what: &str) -> Result<Image8> {
        match image.ok_or_else(|| Error::Invalid(format!("no {what} was given")))? {
            ImageInput::Png(bytes) => Image8::decode_png(&bytes).map_err(|e| Error::Invalid(format!("the {what}: {e}"))),
            ImageInput::Rgba { width, height, pixels } => {
                if pixels.len() != width * height * 4 {
                    return Err(Error::Invalid(format!("the {what} has {} bytes, not {width}x{height} RGBA pixels", pixels.len())));
                }
                let pixels = pixels.chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect();
                Ok(Image8 { width, height, channels: 3, pixels })
            }
        }
    }
}

/// What the page needs to lay out its controls for the loaded model.
#[derive(Serialize)]
#[cfg_attr(test, derive(TS), ts(export, optional_fields))]
pub struct ModelInfo {
    pub default_size: usize,
    pub size_multiple: usize,
    /// Absent when the model's own scheduler is not one the engine has: the user must pick one.
    pub default_scheduler: Option<String>,
    /// Present for an upscaler.
    pub upscaler: Option<UpscalerInfo>,
}

/// What an upscaler makes of an image.
#[derive(Serialize)]
#[cfg_attr(test, derive(TS), ts(export, optional_fields))]
pub struct UpscalerInfo {
    /// The output's size over the image's: 4 for the x4 upscaler, 2 for the latent one.
    pub factor: usize,
    /// The x4 upscaler's highest noise level; the latent upscaler takes none.
    pub max_noise_level: Option<usize>,
}

/// A run as it starts: its UNet calls in all, the output size, and what the user should know
/// (a resized input, a preview decoder that does not fit the model).
#[derive(Serialize)]
#[cfg_attr(test, derive(TS), ts(export))]
pub struct Started {
    pub total: usize,
    pub width: usize,
    pub height: usize,
    pub warnings: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(mode: ModeName, image: Option<ImageInput>) -> GenerateRequest {
        let (negative_prompt, steps, guidance, scheduler, width, height, mask, strength, resize_mode, mask_blur, noise_level) = Default::default();
        GenerateRequest { mode, prompt: "a cat".into(), seed: 7, image, negative_prompt, steps, guidance, scheduler, width, height, mask, strength, resize_mode, mask_blur, noise_level, image_latents: None }
    }

    #[test]
    fn a_request_becomes_the_mode_s_job_with_its_defaults() {
        let job = request(ModeName::Txt2img, None).into_job().unwrap();
        assert!(matches!(job.mode, Mode::TextToImage));
        assert_eq!((job.request.seed, job.request.negative_prompt.as_str()), (Some(7), ""));
        let rgba = ImageInput::Rgba { width: 1, height: 1, pixels: vec![1, 2, 3, 255] };
        let Mode::ImageToImage(input) = request(ModeName::Img2img, Some(rgba)).into_job().unwrap().mode else { panic!("image to image") };
        assert_eq!((input.strength, input.image.pixels), (img2img::DEFAULT_STRENGTH, vec![1, 2, 3]));
    }

    #[test]
    fn missing_or_malformed_images_are_refused_by_name() {
        let err = |r: GenerateRequest| r.into_job().err().expect("refused").to_string();
        assert!(err(request(ModeName::Upscale, None)).contains("no image was given"));
        let short = ImageInput::Rgba { width: 2, height: 2, pixels: vec![0; 4] };
        assert!(err(request(ModeName::Img2img, Some(short))).contains("the init image has 4 bytes, not 2x2 RGBA pixels"));
    }
}
