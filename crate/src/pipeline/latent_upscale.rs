//! The latent x2 upscaler as diffusers' `StableDiffusionLatentUpscalePipeline`: an image's
//! latents (encoded by the VAE, or a result's before its decoding), doubled by nearest-neighbour,
//! are extra UNet channels while latents of twice their size are denoised with the folder's own
//! Euler schedule. The UNet is wrapped as k-diffusion's denoiser ([`Preconditioning`]) and
//! conditioned, besides the text, on a noise-level embedding and the pooled text through its
//! `timestep_cond`.
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn::tensor::{Tensor, TensorData};

use super::buffers::Footprint;
use super::upscale::{ImageLatents, Upscale};
use super::{Conditioning, Denoising, Request, StableDiffusion};
use crate::error::{Error, Result};
use crate::model::unet::TextConditioning;
use crate::schedulers::Scheduler;

/// diffusers' default for `StableDiffusionLatentUpscalePipeline.__call__`.
pub const DEFAULT_STEPS: usize = 75;
/// Width of each half of the noise-level embedding (ones, then zeros: noise level 0, the only
/// one the pipeline uses) before the pooled text in the UNet's timestep condition.
const NOISE_LEVEL_HALF: usize = 64;

impl StableDiffusion {
    /// Validates `req` and `input`, encodes the image and prepares the latents.
    pub(super) fn start_latent_upscale(&self, req: Request, input: Upscale) -> Result<Denoising> {
        let own = self.default_scheduler()?;
        let refused = [
            (input.noise_level.is_some(), "the latent upscaler adds no noise to its image: a noise level does not apply".to_string()),
            (req.scheduler.is_some_and(|kind| kind != own), format!("the latent upscaler steps with its own scheduler config ({}): another scheduler does not apply", own.name())),
            (req.width.is_some() || req.height.is_some(), "the output is twice the image's size; width and height cannot change it".to_string()),
        ];
        if let Some((_, why)) = refused.into_iter().find(|(bad, _)| *bad) {
            return Err(Error::Invalid(why));
        }
        let channels = 2 * self.latent_channels();
        if self.unet.config.in_channels != channels {
            return Err(Error::Invalid(format!("{}: the latent upscaler needs a UNet with {channels} input channels; this has {}", self.name, self.unet.config.in_channels)));
        }
        let (width, height) = (input.image.width, input.image.height);
        // The UNet runs on latents twice the image's latent size, down to at least 2 samples
        // at its deepest level (its down-sampling pads by reflection).
        let f = self.vae.config.scale_factor();
        let minimum = f * self.unet.config.downsample_factor();
        let multiple = minimum / 2;
        for (name, v) in [("width", width), ("height", height)] {
            if v < minimum || v % multiple != 0 {
                return Err(Error::Invalid(format!("the image's {name} {v} is not a multiple of {multiple} of at least {minimum} (the VAE's factor {f} and the UNet's down-sampling)")));
            }
        }
        let guidance = req.guidance.unwrap_or(self.family.guidance);
        // diffusers upscales unconditioned on the text at guidance 0.
        let req = if guidance == 0.0 { Request { prompt: String::new(), ..req } } else { req };
        let size = Footprint { width, height, multiple, latent_step: f / 2, output_scale: 2, tile: None, encodes_image: true };
        let mut setup = self.setup(&req, DEFAULT_STEPS, self.family.guidance, size)?;
        if setup.scheduler.sigmas().is_none() {
            return Err(Error::Invalid(format!("{}: the latent upscaler steps with sigmas, which its scheduler ({}) does not have", self.name, setup.kind.name())));
        }
        setup.text = self.timestep_condition(setup.text)?;
        // diffusers samples the image's encoding first, then draws the latents.
        let [_, c, h, w] = self.latent_shape(width, height);
        let given = input.latents.map(|given| self.given_latents(given, [1, c, h, w]));
        if let Some(Err(why)) = &given {
            setup.warnings.push(format!("{why}: the image's pixels were encoded instead"));
        }
        let image_latents = match given {
            Some(Ok(latents)) => latents,
            _ => {
                let image = Tensor::<4>::from_data(TensorData::new(input.image.normalized(), [1, 3, height, width]), &self.device);
                let encode_noise = setup.normals(input.low_res_noise, [1, c, h, w], "image encoding noise")?;
                self.encode_image(image, encode_noise)?
            }
        };
        let image_condition = interpolate(image_latents, InterpolateOptions::new(InterpolateMode::Nearest).with_output_size([2 * h, 2 * w]));
        let noise = setup.normals(req.latents, [1, c, 2 * h, 2 * w], "initial latents")?;
        let latents = noise.mul_scalar(setup.scheduler.init_noise_sigma());
        let conditioning = Conditioning { extra_channels: Some(image_condition), k_diffusion: true, ..Default::default() };
        Ok(setup.denoising(latents, 0, conditioning, req.step_noise, 2 * width, 2 * height))
    }

    /// `given` latents of the image, or why they cannot stand for it: they must be of this
    /// upscaler's VAE, of the image's size, and finite.
    fn given_latents(&self, given: ImageLatents, shape: [usize; 4]) -> std::result::Result<Tensor<4>, String> {
        let ours = self.vae.config.scaling_factor;
        if let Some(theirs) = given.scaling_factor.filter(|f| (f - ours).abs() > 1e-6) {
            return Err(format!("the image's latents are of a VAE with scaling factor {theirs}, not this upscaler's {ours}"));
        }
        if given.latents.shape != shape {
            return Err(format!("the image's latents have shape {:?}, not the image's {shape:?}", given.latents.shape));
        }
        if given.latents.values.iter().any(|v| !v.is_finite()) {
            return Err("the image's latents are not all finite".into());
        }
        Ok(Tensor::from_data(TensorData::new(given.latents.values, shape), &self.device))
    }

    /// The text states with each pooled embedding behind the noise-level embedding, as the
    /// UNet's `timestep_cond`, which must be as wide.
    fn timestep_condition(&self, text: super::TextStates) -> Result<super::TextStates> {
        let mut level = vec![1.0f32; NOISE_LEVEL_HALF];
        level.resize(2 * NOISE_LEVEL_HALF, 0.0);
        let level = Tensor::<2>::from_data(TensorData::new(level, [1, 2 * NOISE_LEVEL_HALF]), &self.device);
        let width = |t: &TextConditioning| t.pooled.as_ref().map(|p| 2 * NOISE_LEVEL_HALF + p.dims()[1]);
        let wanted = self.unet.config.time_cond_proj_dim;
        let given = match &text {
            super::TextStates::Single(t) | super::TextStates::Paired(t) | super::TextStates::Separate { prompt: t, .. } => width(t),
        };
        if given != wanted {
            return Err(Error::Invalid(format!("{}: the UNet's time_cond_proj_dim is {wanted:?}, but the noise level and the pooled text make {given:?}", self.name)));
        }
        Ok(text.map(|t| {
            let pooled = t.pooled.map(|p| Tensor::cat(vec![level.clone().repeat_dim(0, p.dims()[0]), p], 1));
            TextConditioning { hidden: t.hidden, pooled }
        }))
    }
}

/// k-diffusion's wrapping of the UNet at one step's sigma: the UNet takes `ln(σ) / 4` as its
/// timestep, and its output `F` (one channel more than the latents, the last unused) gives the
/// denoised latents `x / (σ² + 1) + F · σ / √(σ² + 1)`, which the scheduler steps with as its
/// `sample` prediction.
pub(super) struct Preconditioning {
    sigma: f32,
}

impl Preconditioning {
    pub(super) fn at(scheduler: &dyn Scheduler, index: usize) -> Self {
        let sigmas = scheduler.sigmas().expect("the latent upscaler's Euler scheduler has sigmas");
        Self { sigma: sigmas[index] as f32 }
    }

    pub(super) fn unet_timestep(&self) -> f64 {
        (self.sigma.ln() * 0.25) as f64
    }

    /// `output` is the (guided) UNet output, `latents` the unscaled latents it was made from.
    pub(super) fn denoised(&self, output: Tensor<4>, latents: Tensor<4>) -> Tensor<4> {
        let sigma = self.sigma;
        let channels = latents.dims()[1];
        let skip = 1.0 / (sigma * sigma + 1.0);
        let out = sigma / (sigma * sigma + 1.0).sqrt();
        latents.mul_scalar(skip) + output.narrow(1, 0, channels).mul_scalar(out)
    }
}
