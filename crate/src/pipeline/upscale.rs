//! The x4 upscaler as diffusers' `StableDiffusionUpscalePipeline`: latents at the low-resolution
//! image's size are denoised with the image (noised to `noise_level` by the `low_res_scheduler`)
//! as extra UNet channels and the noise level as the UNet's class label; the upscaler's own VAE
//! (factor 4) decodes them.
//!
//! Large inputs run in overlapping tiles ([`Tiles`]): each step predicts every window and blends
//! the overlaps, and the VAE decodes window by window the same way, so memory follows the tile
//! size. One tile covering the whole input is exactly the untiled pipeline.
use burn::tensor::{Tensor, TensorData};

use super::image_processor::Image8;
use super::tiles::{TileSize, Tiles};
use super::buffers::Footprint;
use super::family::Conditioner;
use super::{Conditioning, Request, StableDiffusion};
use crate::error::{Error, Result};
use crate::files::{ModelFiles, short_name};
use crate::model::unet::{AddedConditioning, UNetConfig};
use crate::npy;
use crate::schedulers::{ForwardNoise, SchedulerConfig};

/// diffusers' defaults for `StableDiffusionUpscalePipeline.__call__`.
pub const DEFAULT_STEPS: usize = 75;
pub const DEFAULT_NOISE_LEVEL: usize = 20;
/// diffusers' `max_noise_level` when `model_index.json` does not give one.
pub const DEFAULT_MAX_NOISE_LEVEL: usize = 350;
/// Tiles that keep a 512² input (2048² out) within a browser's memory.
pub const DEFAULT_TILES: TileSize = TileSize { size: 128, overlap: 32 };

/// What an upscaler folder adds: how the low-resolution image is noised and how far.
pub struct UpscalerConfig {
    pub low_res_noise: ForwardNoise,
    /// The highest level the low-res scheduler and the UNet's class table both have.
    pub max_noise_level: usize,
}

impl UpscalerConfig {
    pub const LOW_RES_SCHEDULER: &str = "low_res_scheduler/scheduler_config.json";

    /// `max_noise_level` is `model_index.json`'s; the noise level is a row of `unet`'s class table.
    pub(super) fn load(files: &dyn ModelFiles, max_noise_level: Option<usize>, unet: &UNetConfig) -> Result<Self> {
        let config = SchedulerConfig::from_json(&files.require_text(Self::LOW_RES_SCHEDULER)?)?;
        let low_res_noise = ForwardNoise::from_config(&config)?;
        let max_noise_level = max_noise_level.unwrap_or(DEFAULT_MAX_NOISE_LEVEL);
        if max_noise_level >= low_res_noise.levels() {
            return Err(Error::Invalid(format!(
                "{}: max_noise_level {max_noise_level} is beyond the low_res_scheduler's {} timesteps",
                short_name(files),
                low_res_noise.levels()
            )));
        }
        let Some(classes) = unet.num_class_embeds.filter(|&n| n > 0) else {
            return Err(Error::Invalid(format!("{}: the upscaler's UNet has no class table (num_class_embeds) for the noise level", short_name(files))));
        };
        Ok(Self { low_res_noise, max_noise_level: max_noise_level.min(classes - 1) })
    }
}

/// What upscaling adds to a [`Request`] (whose `latents` are the initial noise).
#[derive(Clone)]
pub struct Upscale {
    /// The low-resolution image; the output is the VAE factor (4) times its size.
    pub image: Image8,
    /// How much noise the x4 upscaler adds to `image` first (`0..=max_noise_level`, default
    /// [`DEFAULT_NOISE_LEVEL`]); more lets the model invent more detail. The latent upscaler
    /// takes none.
    pub noise_level: Option<usize>,
    /// The x4 upscaler's tiles: `None`, or a tile at least as large as the image, is one pass,
    /// exactly diffusers' result. The latent upscaler runs in one pass.
    pub tiles: Option<TileSize>,
    /// The image's noise instead of the seed's (parity tests): the x4 upscaler's noise on the
    /// image `[1, 3, H, W]`, the latent upscaler's sample of its encoding `[1, 4, H/8, W/8]`.
    pub low_res_noise: Option<npy::Array>,
    /// The image's latents, for the latent upscaler to take instead of encoding the image: a
    /// text-to-image result before its decoding. The x4 upscaler works on the pixels.
    pub latents: Option<ImageLatents>,
}

/// Latents `[1, C, H/f, W/f]` of an image, scaled as the pipelines make them (diffusers'
/// `output_type="latent"`), and the scaling factor of the VAE they belong to.
#[derive(Clone)]
pub struct ImageLatents {
    pub latents: npy::Array,
    /// `None`: taken to be the upscaler's VAE's (latents from a file, which does not say).
    pub scaling_factor: Option<f64>,
}

impl Upscale {
    /// What this mode adds to the PNG's `parameters`, in Automatic1111's words; the tiles only
    /// when the image spans more than one.
    pub fn parameters(&self) -> Vec<(&'static str, String)> {
        let mut extra = vec![("Noise level", self.noise_level.unwrap_or(DEFAULT_NOISE_LEVEL).to_string())];
        if let Some(tiles) = self.tiles.filter(|t| self.image.width > t.size || self.image.height > t.size) {
            extra.extend([("Tile size", tiles.size.to_string()), ("Tile overlap", tiles.overlap.to_string())]);
        }
        extra
    }
}

impl StableDiffusion {
    /// Validates `req` and `input` and starts the folder's upscaler: the x4 or the latent x2.
    pub fn start_upscale(&self, req: Request, input: Upscale) -> Result<super::Denoising> {
        match &self.conditioner {
            Conditioner::NoiseLevel(upscaler) => self.start_x4_upscale(upscaler, req, input),
            Conditioner::LatentUpscale => self.start_latent_upscale(req, input),
            _ => Err(Error::Invalid(format!("{}: not an upscaler (model_index.json names another pipeline)", self.name))),
        }
    }

    /// For an upscaler, its output's size over the image's and the highest noise level it takes
    /// (the latent upscaler takes none).
    pub fn upscaling(&self) -> Option<(usize, Option<usize>)> {
        match &self.conditioner {
            Conditioner::NoiseLevel(upscaler) => Some((self.vae.config.scale_factor(), Some(upscaler.max_noise_level))),
            Conditioner::LatentUpscale => Some((2, None)),
            _ => None,
        }
    }

    /// What upscaling adds to the PNG's `parameters`: the x4 upscaler's settings.
    pub fn upscale_parameters(&self, input: &Upscale) -> Vec<(&'static str, String)> {
        match self.conditioner {
            Conditioner::NoiseLevel(_) => input.parameters(),
            _ => Vec::new(),
        }
    }

    /// Noises the low-resolution image and prepares the latents.
    fn start_x4_upscale(&self, upscaler: &UpscalerConfig, req: Request, input: Upscale) -> Result<super::Denoising> {
        let channels = self.latent_channels() + 3;
        if self.unet.config.in_channels != channels {
            return Err(Error::Invalid(format!("{}: upscaling needs a UNet with {channels} input channels; this has {}", self.name, self.unet.config.in_channels)));
        }
        let (width, height) = (input.image.width, input.image.height);
        if req.width.is_some() || req.height.is_some() {
            return Err(Error::Invalid(format!("the output size is {} times the image's; width and height cannot change it", self.vae.config.scale_factor())));
        }
        // The latents have the input's size, so only the UNet's down-sampling constrains it.
        let multiple = self.unet.config.downsample_factor();
        for (name, v) in [("width", width), ("height", height)] {
            if v == 0 || v % multiple != 0 {
                return Err(Error::Invalid(format!("the image's {name} {v} is not a positive multiple of {multiple} (the UNet's down-sampling)")));
            }
        }
        let max_level = upscaler.max_noise_level;
        let noise_level = input.noise_level.unwrap_or(DEFAULT_NOISE_LEVEL);
        if noise_level > max_level {
            return Err(Error::Invalid(format!("noise level {noise_level} is above the model's maximum {max_level}")));
        }
        let tiles = match input.tiles {
            Some(tile) => Tiles::new(tile, width, height, multiple)?,
            None => None,
        };
        // The latents have the input's size; the output is the VAE's factor larger.
        let f = self.vae.config.scale_factor();
        let size = Footprint { width, height, multiple, latent_step: 1, output_scale: f, tile: input.tiles.map(|t| t.size), encodes_image: false };
        let mut setup = self.setup(&req, DEFAULT_STEPS, self.family.guidance, size)?;
        // diffusers draws the image's noise first, then the latents.
        let image = Tensor::<4>::from_data(TensorData::new(input.image.normalized(), [1, 3, height, width]), &self.device);
        let image_noise = setup.normals(input.low_res_noise, [1, 3, height, width], "low-resolution image noise")?;
        let noisy_image = upscaler.low_res_noise.add_noise(image, image_noise, noise_level);
        let noise = setup.normals(req.latents, [1, self.latent_channels(), height, width], "initial latents")?;
        let latents = noise.mul_scalar(setup.scheduler.init_noise_sigma());
        let conditioning = Conditioning { extra_channels: Some(noisy_image), added: AddedConditioning::ClassLabel(noise_level), tiles, ..Default::default() };
        Ok(setup.denoising(latents, 0, conditioning, req.step_noise, width * f, height * f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_name_the_tiles_only_when_there_are_several() {
        let image = |side: usize| Image8 { width: side, height: side, channels: 3, pixels: vec![0; side * side * 3] };
        let input = |side| Upscale { image: image(side), noise_level: None, tiles: Some(DEFAULT_TILES), low_res_noise: None, latents: None };
        assert_eq!(input(128).parameters(), vec![("Noise level", "20".to_string())]);
        let names: Vec<_> = input(136).parameters().into_iter().map(|(name, _)| name).collect();
        assert_eq!(names, ["Noise level", "Tile size", "Tile overlap"]);
    }
}
