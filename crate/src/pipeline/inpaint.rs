//! Inpainting as diffusers' `StableDiffusionInpaintPipeline`. White in the mask is repainted,
//! black kept. Inpainting checkpoints (UNet with `2 × latent + 1` input channels) see the mask and
//! the masked image's latents beside the latents; plain checkpoints repaint by blending: after
//! each step the kept region is reset to the image's latents noised to the next timestep.
use burn::tensor::{Tensor, TensorData};

use super::image_processor::{Image8, Mask};
use super::img2img::{begin_index, check_strength, with_enough_steps};
use super::resize::ResizeMode;
use super::{Conditioning, DEFAULT_STEPS, MaskBlend, Request, StableDiffusion};
use crate::error::{Error, Result};
use crate::npy;

/// The largest mask blur in pixels, as in Automatic1111's web UI (and the page's control).
pub const MAX_MASK_BLUR: f32 = 64.0;

/// diffusers' default `strength` for inpainting: the masked region starts from pure noise.
pub const DEFAULT_STRENGTH: f64 = 1.0;

/// What inpainting adds to a [`Request`] (whose `latents` are the initial noise).
#[derive(Clone)]
pub struct Inpaint {
    /// The image to repaint, fitted to the output size by `resize`.
    pub image: Image8,
    /// Same size as the image (and fitted with it); converted to grey and binarised at half
    /// intensity.
    pub mask: Image8,
    pub resize: ResizeMode,
    /// Gaussian blur of the mask in pixels before binarisation (PIL's `GaussianBlur`, as
    /// diffusers' `mask_processor.blur`); it rounds the mask's outline. 0 = none.
    pub mask_blur: f32,
    /// In (0, 1]; below 1 the repainted region starts from the noised image rather than noise.
    pub strength: f64,
    /// The VAE's latent-sampling noise for the image and for the masked image (parity tests).
    pub image_noise: Option<npy::Array>,
    pub masked_image_noise: Option<npy::Array>,
}

impl Inpaint {
    /// What this mode adds to the PNG's `parameters`, in Automatic1111's words.
    pub fn parameters(&self) -> Vec<(&'static str, String)> {
        vec![("Denoising strength", self.strength.to_string()), ("Mask blur", self.mask_blur.to_string())]
    }
}

impl StableDiffusion {
    /// Validates `req` and `input`, prepares the mask, the image latents and the initial latents.
    pub fn start_inpaint(&self, req: Request, input: Inpaint) -> Result<super::Denoising> {
        let channels = self.latent_channels();
        let conditioned = self.unet.config.in_channels == 2 * channels + 1;
        self.require_unet("inpainting", if conditioned { 2 * channels + 1 } else { channels })?;
        let (image_width, image_height) = (input.image.width, input.image.height);
        if (input.mask.width, input.mask.height) != (image_width, image_height) {
            return Err(Error::Invalid(format!(
                "the mask is {}x{} but the image is {image_width}x{image_height}; they must be the same size",
                input.mask.width, input.mask.height
            )));
        }
        if !(0.0..=MAX_MASK_BLUR).contains(&input.mask_blur) {
            return Err(Error::Invalid(format!("mask blur {} must be between 0 and {MAX_MASK_BLUR} pixels", input.mask_blur)));
        }
        let strength = check_strength(input.strength)?;
        let (width, height) = self.output_size(&req, &input.image)?;
        let (image_in, resized) = input.resize.fit(input.image, width, height, "image");
        let (mask_in, _) = input.resize.fit(input.mask, width, height, "mask");
        let (req, warning) = with_enough_steps(req, strength);
        let mut setup = self.setup(&req, DEFAULT_STEPS, self.family.guidance, self.image_footprint(width, height, true))?;
        setup.warnings.extend(resized.into_iter().chain(warning));
        let begin = begin_index(setup.steps, strength);
        let shape = self.latent_shape(width, height);
        let [_, _, h, w] = shape;
        let mask = Mask::preprocess(&mask_in, input.mask_blur, self.vae.config.scale_factor());
        let normalized = image_in.normalized();
        let image = |values: Vec<f32>| Tensor::<4>::from_data(TensorData::new(values, [1, 3, height, width]), &self.device);
        let latent_mask = Tensor::<4>::from_data(TensorData::new(mask.latent.clone(), [1, 1, h, w]), &self.device);

        // diffusers' order of draws: the image's latents (when used), the initial noise, then
        // the masked image's latents (inpainting checkpoints only).
        let full_strength = strength == 1.0;
        let image_latents = if !conditioned || !full_strength {
            let encode_noise = setup.normals(input.image_noise, shape, "VAE sampling noise of the image")?;
            Some(self.encode_image(image(normalized.clone()), encode_noise)?)
        } else {
            None
        };
        let noise = setup.normals(req.latents, shape, "initial latents")?;
        let latents = match &image_latents {
            Some(image_latents) if !full_strength => setup.scheduler.add_noise(image_latents.clone(), noise.clone(), begin),
            _ => noise.clone().mul_scalar(setup.scheduler.init_noise_sigma()),
        };
        let conditioning = match image_latents {
            Some(image_latents) if !conditioned => {
                Conditioning { blend: Some(MaskBlend { mask: latent_mask.repeat_dim(1, channels), image_latents, noise }), ..Default::default() }
            }
            _ => {
                let encode_noise = setup.normals(input.masked_image_noise, shape, "VAE sampling noise of the masked image")?;
                let masked_latents = self.encode_image(image(mask.mask_image(&normalized)), encode_noise)?;
                Conditioning { extra_channels: Some(Tensor::cat(vec![latent_mask, masked_latents], 1)), ..Default::default() }
            }
        };
        Ok(setup.denoising(latents, begin, conditioning, req.step_noise, width, height))
    }
}
