//! Image-to-image as diffusers' `StableDiffusionImg2ImgPipeline`: the init image's latents,
//! noised to the timestep where `strength` enters the schedule, are denoised over the rest of it.
use burn::tensor::{Tensor, TensorData};

use super::image_processor::Image8;
use super::resize::ResizeMode;
use super::{Conditioning, DEFAULT_STEPS, Request, StableDiffusion};
use crate::error::{Error, Result};
use crate::npy;

/// diffusers' default `strength` for image-to-image.
pub const DEFAULT_STRENGTH: f64 = 0.8;

/// What image-to-image adds to a [`Request`] (whose `latents` are the noise added to the image).
#[derive(Clone)]
pub struct Img2Img {
    /// The init image, fitted to the output size by `resize` ([`ResizeMode::fit`]).
    pub image: Image8,
    pub resize: ResizeMode,
    /// In (0, 1]: how much of the schedule runs, so how much of the image is repainted.
    pub strength: f64,
    /// The VAE's latent-sampling noise `[1, C, h, w]` instead of the seed's (parity tests).
    pub encode_noise: Option<npy::Array>,
}

impl Img2Img {
    /// What this mode adds to the PNG's `parameters`, in Automatic1111's words.
    pub fn parameters(&self) -> Vec<(&'static str, String)> {
        vec![("Denoising strength", self.strength.to_string())]
    }
}

/// Checks a `strength` in (0, 1].
pub(super) fn check_strength(strength: f64) -> Result<f64> {
    if strength > 0.0 && strength <= 1.0 {
        Ok(strength)
    } else {
        Err(Error::Invalid(format!("strength {strength} is outside (0, 1]")))
    }
}

/// diffusers' `get_timesteps`: the schedule for `steps` is kept from call `t_start` on, where
/// `t_start = steps - min(int(steps * strength), steps)` (every supported scheduler has order 1).
pub(super) fn begin_index(steps: usize, strength: f64) -> usize {
    steps - ((steps as f64 * strength) as usize).min(steps)
}

/// `req` with enough steps that `strength` leaves at least one to run: one-step models
/// (SD-Turbo) at strength 0.5 get 2, as diffusers' SD-Turbo guide does, and a warning says so.
pub(super) fn with_enough_steps(req: Request, strength: f64) -> (Request, Option<String>) {
    let steps = req.steps.unwrap_or(DEFAULT_STEPS);
    let runs = |n: usize| (n as f64 * strength) as usize >= 1;
    if runs(steps) {
        return (req, None);
    }
    let mut raised = (1.0 / strength).ceil() as usize;
    while !runs(raised) {
        raised += 1;
    }
    let warning = format!("{steps} steps × strength {strength} would run none, so {raised} steps are used (at least one must run)");
    (Request { steps: Some(raised), ..req }, Some(warning))
}

impl StableDiffusion {
    /// Validates `req` and `input`, encodes the image and prompt, and noises the image latents
    /// to the first timestep that runs.
    pub fn start_img2img(&self, req: Request, input: Img2Img) -> Result<super::Denoising> {
        self.require_unet("image-to-image", self.latent_channels())?;
        let strength = check_strength(input.strength)?;
        let (width, height) = self.output_size(&req, &input.image)?;
        let (fitted, resized) = input.resize.fit(input.image, width, height, "init image");
        let (req, warning) = with_enough_steps(req, strength);
        let mut setup = self.setup(&req, DEFAULT_STEPS, self.family.guidance, self.image_footprint(width, height, true))?;
        setup.warnings.extend(resized.into_iter().chain(warning));
        let begin = begin_index(setup.steps, strength);
        let shape = self.latent_shape(width, height);
        let image = Tensor::<4>::from_data(TensorData::new(fitted.normalized(), [1, 3, height, width]), &self.device);
        let encode_noise = setup.normals(input.encode_noise, shape, "VAE sampling noise")?;
        let image_latents = self.encode_image(image, encode_noise)?;
        let noise = setup.normals(req.latents, shape, "initial latents")?;
        let latents = setup.scheduler.add_noise(image_latents, noise, begin);
        Ok(setup.denoising(latents, begin, Conditioning::default(), req.step_noise, width, height))
    }

    /// The output size of a mode that starts from `image`: the request's width and height,
    /// else the image's own rounded to the nearest size the model takes.
    pub(super) fn output_size(&self, req: &Request, image: &Image8) -> Result<(usize, usize)> {
        let multiple = self.size_multiple();
        let round = |v: usize| ((v + multiple / 2) / multiple).max(1) * multiple;
        let (width, height) = (req.width.unwrap_or(round(image.width)), req.height.unwrap_or(round(image.height)));
        self.check_size("", width, height)?;
        Ok((width, height))
    }

}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn begin_index_follows_get_timesteps() {
        assert_eq!(begin_index(10, 1.0), 0);
        assert_eq!(begin_index(10, 0.5), 5);
        // int(4 * 0.8) = 3 steps run.
        assert_eq!(begin_index(4, 0.8), 1);
        // 10 * 0.3 is 3.0000000000000004 in float64: 3 steps run, as in Python.
        assert_eq!(begin_index(10, 0.3), 7);
        assert!(check_strength(0.0).is_err() && check_strength(1.5).is_err() && check_strength(f64::NAN).is_err());
    }

    #[test]
    fn too_few_steps_for_the_strength_are_raised_with_a_warning() {
        let steps = |n: usize, strength: f64| {
            let (req, warning) = with_enough_steps(Request { steps: Some(n), ..Default::default() }, strength);
            (req.steps.unwrap(), warning.is_some())
        };
        assert_eq!(steps(1, 0.5), (2, true));
        assert_eq!(steps(1, 0.3), (4, true));
        assert_eq!(steps(2, 0.5), (2, false));
        assert_eq!(steps(4, 1.0), (4, false));
        let (_, warning) = with_enough_steps(Request { steps: Some(1), ..Default::default() }, 0.5);
        assert_eq!(warning.unwrap(), "1 steps × strength 0.5 would run none, so 2 steps are used (at least one must run)");
    }
}
