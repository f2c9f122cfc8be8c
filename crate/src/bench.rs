//! The three calls a generation is made of, set up with fixed inputs, so that the CLI
//! (`kiln bench`) and the page (`scripts/bench-web`) time exactly the same work; each edge
//! only brings its clock and its way of waiting for the device.
use burn::tensor::{Device, Tensor, TensorData};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::clip::{ClipTextConfig, ClipTextModel, HiddenLayer, Pooling};
use crate::model::unet::{AddedConditioning, TextConditioning, UNet2DConditionModel};
use crate::model::vae::AutoencoderKL;
use crate::pipeline::StableDiffusion;
use crate::pipeline::rng::NormalRng;
use crate::weights::Weights;

/// The published configs (unet, vae, text_encoder[, text_encoder_2], scheduler) of the
/// full-size architectures benchmarked with random weights.
pub const PRESETS: [(&str, &str); 3] = [
    ("sd15", include_str!("../presets/sd15.json")),
    ("sd-turbo", include_str!("../presets/sd-turbo.json")),
    ("sdxl-turbo", include_str!("../presets/sdxl-turbo.json")),
];

/// A preset's configs by component name.
pub fn preset(name: &str) -> Result<Value> {
    let (_, text) = PRESETS.iter().find(|(n, _)| *n == name).ok_or_else(|| Error::Invalid(format!("unknown model {name:?}; choose sd15, sd-turbo or sdxl-turbo")))?;
    Ok(serde_json::from_str(text).expect("embedded presets are valid JSON"))
}

/// A preset's text encoders' configs, in the order their states are concatenated.
pub fn text_encoder_configs(preset: &Value) -> Result<Vec<ClipTextConfig>> {
    ["text_encoder", "text_encoder_2"].iter().filter(|key| preset.get(**key).is_some()).map(|key| config(preset, key)).collect()
}

/// The timestep of every timed UNet call (mid-schedule; the cost does not depend on it).
pub const TIMESTEP: f64 = 500.0;

/// The text encoders, a UNet and a VAE with the inputs of one guided step at one size.
pub struct Components {
    pub name: String,
    text_encoders: Vec<ClipTextModel>,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    /// Token ids `[batch][77]`: start, a few words, end padding.
    ids: Vec<Vec<u32>>,
    /// The UNet call's inputs as host values (the ONNX Runtime peer takes the same ones).
    pub sample: Vec<f32>,
    pub sample_shape: [usize; 4],
    pub context: Vec<f32>,
    pub context_shape: [usize; 3],
    /// SDXL's pooled text `[batch, P]` and time ids, for a UNet with `text_time`.
    pooled: Option<(Vec<f32>, [usize; 2])>,
    added: AddedConditioning,
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
        let text_encoders = text_encoder_configs(&preset)?.into_iter().map(|c| ClipTextModel::load(&w[0], c)).collect::<Result<_>>()?;
        let unet = UNet2DConditionModel::load(&w[1], config(&preset, "unet")?)?;
        let vae = AutoencoderKL::load(&w[2], config(&preset, "vae")?)?;
        let params = Params { text_encoder: w[0].random_stats().0, unet: w[1].random_stats().0, vae: w[2].random_stats().0 };
        Ok((Self::new(preset_name.to_owned(), text_encoders, unet, vae, size, batch, device)?, params))
    }

    /// A loaded pipeline's components (its own weights).
    pub fn from_pipeline(pipe: StableDiffusion, size: usize, batch: usize) -> Result<Self> {
        let text_encoders = pipe.text_encoders.iter().map(|e| e.model()).collect::<Result<_>>()?;
        let device = pipe.device().clone();
        Self::new(pipe.name, text_encoders, pipe.unet, pipe.vae, size, batch, &device)
    }

    fn new(name: String, text_encoders: Vec<ClipTextModel>, unet: UNet2DConditionModel, vae: AutoencoderKL, size: usize, batch: usize, device: &Device) -> Result<Self> {
        let f = vae.config.scale_factor();
        let multiple = f * unet.config.downsample_factor();
        if size == 0 || size % multiple != 0 || batch == 0 {
            return Err(Error::Invalid(format!("size {size} must be a positive multiple of {multiple}, batch at least 1")));
        }
        let latent = size / f;
        let len = text_encoders[0].config.max_position_embeddings;
        let words = [49406, 320, 1125, 539, 320, 2368, 49407];
        let ids = vec![words.iter().copied().chain(std::iter::repeat(49407)).take(len).collect(); batch];
        let mut rng = NormalRng::new(0);
        let sample_shape = [batch, unet.config.in_channels, latent, latent];
        let context_shape = [batch, len, text_encoders.iter().map(|e| e.config.hidden_size).sum()];
        let sample = rng.normals(sample_shape.iter().product());
        let context = rng.normals(context_shape.iter().product());
        let text_time = unet.config.addition_embed_type.is_some();
        let pooled = text_time.then(|| {
            let shape = [batch, text_encoders.last().expect("a text encoder").config.projection_dim];
            (rng.normals(shape.iter().product()), shape)
        });
        let added = if text_time { AddedConditioning::time_ids(size, size) } else { AddedConditioning::None };
        let latents_shape = [1, vae.config.latent_channels, latent, latent];
        Ok(Self { name, text_encoders, unet, vae, ids, sample, sample_shape, context, context_shape, pooled, added, latents_shape, device: device.clone() })
    }

    /// One call of each text encoder on `batch` prompts, their states side by side.
    pub fn text_encoder_call(&self) -> Tensor<3> {
        let mut states: Vec<_> = self.text_encoders.iter().map(|e| e.forward(&self.ids, HiddenLayer::Last, Pooling::None).hidden).collect();
        if states.len() == 1 { states.remove(0) } else { Tensor::cat(states, 2) }
    }

    /// One UNet call on `batch` latents (2: one guided step) at [`TIMESTEP`].
    pub fn unet_call(&self) -> Tensor<4> {
        let sample = Tensor::<4>::from_data(TensorData::new(self.sample.clone(), self.sample_shape), &self.device);
        let context = Tensor::<3>::from_data(TensorData::new(self.context.clone(), self.context_shape), &self.device);
        let pooled = self.pooled.as_ref().map(|(values, shape)| Tensor::<2>::from_data(TensorData::new(values.clone(), *shape), &self.device));
        self.unet.forward(sample, TIMESTEP, &TextConditioning { hidden: context, pooled }, self.added)
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
