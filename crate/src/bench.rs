//! The three calls a generation is made of, set up with fixed inputs, so that the CLI
//! (`kiln bench`) and the page (`scripts/bench-web`) time exactly the same work; each edge
//! only brings its clock and its way of waiting for the device.
use burn::tensor::{Device, Tensor, TensorData};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::clip::{ClipTextModel, HiddenLayer, Pooling};
use crate::model::unet::{AddedConditioning, TextConditioning, UNet2DConditionModel};
use crate::model::vae::AutoencoderKL;
use crate::pipeline::StableDiffusion;
use crate::pipeline::rng::NormalRng;
use crate::weights::Weights;

/// The published configs (unet, vae, text_encoder, scheduler) of the full-size architectures
/// benchmarked with random weights.
pub const PRESETS: [(&str, &str); 2] = [("sd15", include_str!("../presets/sd15.json")), ("sd-turbo", include_str!("../presets/sd-turbo.json"))];

/// A preset's configs by component name.
pub fn preset(name: &str) -> Result<Value> {
    let (_, text) = PRESETS.iter().find(|(n, _)| *n == name).ok_or_else(|| Error::Invalid(format!("unknown model {name:?}; choose sd15 or sd-turbo")))?;
    Ok(serde_json::from_str(text).expect("embedded presets are valid JSON"))
}

/// The timestep of every timed UNet call (mid-schedule; the cost does not depend on it).
pub const TIMESTEP: f64 = 500.0;

/// A text encoder, a UNet and a VAE with the inputs of one guided step at one size.
pub struct Components {
    pub name: String,
    text_encoder: ClipTextModel,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    /// Token ids `[batch][77]`: start, a few words, end padding.
    ids: Vec<Vec<u32>>,
    /// The UNet call's inputs as host values (the ONNX Runtime peer takes the same ones).
    pub sample: Vec<f32>,
    pub sample_shape: [usize; 4],
    pub context: Vec<f32>,
    pub context_shape: [usize; 3],
    latents_shape: [usize; 4],
    device: Device,
}

/// Counts of parameters per component.
pub struct Params {
    pub text_encoder: u64,
    pub unet: u64,
    pub vae: u64,
}

impl Components {
    /// A published architecture (see [`PRESETS`]) with random weights.
    pub fn random(preset_name: &str, size: usize, batch: usize, device: &Device) -> Result<(Self, Params)> {
        let preset = preset(preset_name)?;
        let w = [0, 1, 2].map(|_| Weights::random(device));
        let text_encoder = ClipTextModel::load(&w[0], config(&preset, "text_encoder")?)?;
        let unet = UNet2DConditionModel::load(&w[1], config(&preset, "unet")?)?;
        let vae = AutoencoderKL::load(&w[2], config(&preset, "vae")?)?;
        let params = Params { text_encoder: w[0].random_stats().0, unet: w[1].random_stats().0, vae: w[2].random_stats().0 };
        Ok((Self::new(preset_name.to_owned(), text_encoder, unet, vae, size, batch, device)?, params))
    }

    /// A loaded pipeline's components (its own weights).
    pub fn from_pipeline(pipe: StableDiffusion, size: usize, batch: usize) -> Result<Self> {
        // The first text encoder: the benchmarked families have one.
        let text_encoder = pipe.text_encoders[0].model()?;
        let device = pipe.device().clone();
        Self::new(pipe.name, text_encoder, pipe.unet, pipe.vae, size, batch, &device)
    }

    fn new(name: String, text_encoder: ClipTextModel, unet: UNet2DConditionModel, vae: AutoencoderKL, size: usize, batch: usize, device: &Device) -> Result<Self> {
        let f = vae.config.scale_factor();
        let multiple = f * unet.config.downsample_factor();
        if size == 0 || size % multiple != 0 || batch == 0 {
            return Err(Error::Invalid(format!("size {size} must be a positive multiple of {multiple}, batch at least 1")));
        }
        let latent = size / f;
        let len = text_encoder.config.max_position_embeddings;
        let words = [49406, 320, 1125, 539, 320, 2368, 49407];
        let ids = vec![words.iter().copied().chain(std::iter::repeat(49407)).take(len).collect(); batch];
        let mut rng = NormalRng::new(0);
        let sample_shape = [batch, unet.config.in_channels, latent, latent];
        let context_shape = [batch, len, text_encoder.config.hidden_size];
        let sample = rng.normals(sample_shape.iter().product());
        let context = rng.normals(context_shape.iter().product());
        let latents_shape = [1, vae.config.latent_channels, latent, latent];
        Ok(Self { name, text_encoder, unet, vae, ids, sample, sample_shape, context, context_shape, latents_shape, device: device.clone() })
    }

    /// One text-encoder call on `batch` prompts.
    pub fn text_encoder_call(&self) -> Tensor<3> {
        self.text_encoder.forward(&self.ids, HiddenLayer::Last, Pooling::None).hidden
    }

    /// One UNet call on `batch` latents (2: one guided step) at [`TIMESTEP`].
    pub fn unet_call(&self) -> Tensor<4> {
        let sample = Tensor::<4>::from_data(TensorData::new(self.sample.clone(), self.sample_shape), &self.device);
        let context = Tensor::<3>::from_data(TensorData::new(self.context.clone(), self.context_shape), &self.device);
        self.unet.forward(sample, TIMESTEP, &TextConditioning { hidden: context, pooled: None }, AddedConditioning::None)
    }

    /// One VAE decode of one image's latents (the first latents of the sample).
    pub fn vae_decode(&self) -> Tensor<4> {
        let n = self.latents_shape.iter().product();
        let latents = Tensor::<4>::from_data(TensorData::new(self.sample[..n].to_vec(), self.latents_shape), &self.device);
        crate::pipeline::decode_latents(&self.vae, latents, None)
    }
}

/// The config of one component (`unet`, `vae`, `text_encoder`) of a [`preset`].
pub fn config<T: serde::de::DeserializeOwned>(preset: &Value, key: &str) -> Result<T> {
    serde_json::from_value(preset[key].clone()).map_err(|e| Error::Invalid(format!("preset {key}: {e}")))
}
