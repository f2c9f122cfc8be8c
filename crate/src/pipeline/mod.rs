//! Text-to-image as diffusers' `StableDiffusionPipeline` does it, driven one step at a time
//! so a caller (CLI loop, browser worker) can report progress and cancel between steps.
pub mod png;
pub mod rng;

use std::collections::VecDeque;
use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::files::{Folder, ModelFiles, json, short_name};
use crate::model::clip::{ClipTextConfig, ClipTextModel};
use crate::model::tokenizer::{ClipTokenizer, TokenizerFiles};
use crate::model::unet::UNet2DConditionModel;
use crate::model::vae::AutoencoderKL;
use crate::schedulers::{self, Scheduler, SchedulerConfig, SchedulerKind};
use crate::weights::Weights;
use rng::NormalRng;

#[derive(Deserialize)]
struct ModelIndex {
    #[serde(rename = "_class_name")]
    class_name: String,
}

pub struct StableDiffusion {
    /// The model's short name, written into PNG metadata.
    pub name: String,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub scheduler_config: SchedulerConfig,
    device: Device,
}

/// One text-to-image request; `None` fields take the model's or diffusers' defaults.
#[derive(Clone, Debug, Default)]
pub struct Request {
    pub prompt: String,
    /// Empty means the empty string, as in diffusers.
    pub negative_prompt: String,
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    pub scheduler: Option<SchedulerKind>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub seed: u64,
    /// Initial noise `[1, C, H/f, W/f]`, unscaled standard normal, instead of the seed's;
    /// its shape sets the size when width or height is not given.
    pub latents: Option<crate::npy::Array>,
    /// Noise for the schedulers that draw it while stepping, in order; for parity with
    /// diffusers given the same draws. `None` continues the seed's stream.
    pub step_noise: Option<VecDeque<Vec<f32>>>,
}

pub const DEFAULT_STEPS: usize = 50;
pub const DEFAULT_GUIDANCE: f64 = 7.5;

impl StableDiffusion {
    /// Loads a diffusers pipeline laid out as published repos are.
    pub fn load(files: &dyn ModelFiles, device: &Device) -> Result<Self> {
        Self::assemble(files, &|stem| Weights::open(files, stem, device), device)
    }

    /// Builds the pipeline from `files` (configs, tokenizer) and `weights`, which maps a
    /// weight file's stem (`unet/diffusion_pytorch_model`) to its tensors.
    pub fn assemble(files: &dyn ModelFiles, weights: &dyn Fn(&str) -> Result<Weights>, device: &Device) -> Result<Self> {
        if files.read("model_index.json")?.is_none() {
            return Err(Error::Invalid(format!("{} is not a diffusers pipeline: model_index.json is missing", files.name())));
        }
        let index: ModelIndex = json(files, "model_index.json")?;
        if !index.class_name.starts_with("StableDiffusion") {
            return Err(Error::Invalid(format!("{}: pipeline class {} is not a Stable Diffusion pipeline", files.name(), index.class_name)));
        }
        let clip_config: ClipTextConfig = json(files, "text_encoder/config.json")?;
        let tokenizer = ClipTokenizer::load(&TokenizerFiles::read(files)?, clip_config.max_position_embeddings)?;
        let text_encoder = ClipTextModel::load(&weights("text_encoder/model")?, clip_config)?;
        let unet = UNet2DConditionModel::load(&weights("unet/diffusion_pytorch_model")?, json(files, "unet/config.json")?)?;
        let vae = AutoencoderKL::load(&weights("vae/diffusion_pytorch_model")?, json(files, "vae/config.json")?)?;
        let scheduler_config = SchedulerConfig::from_json(&files.require_text("scheduler/scheduler_config.json")?)?;
        Ok(Self { name: short_name(files), tokenizer, text_encoder, unet, vae, scheduler_config, device: device.clone() })
    }

    /// Loads a diffusers folder on disk.
    pub fn load_dir(dir: &Path, device: &Device) -> Result<Self> {
        Self::load(&Folder(dir.to_owned()), device)
    }

    /// Width and height must be multiples of this: the VAE's factor times the UNet's down-sampling.
    pub fn size_multiple(&self) -> usize {
        self.vae.config.scale_factor() * self.unet.config.downsample_factor()
    }

    /// `sample_size` × the VAE factor, as diffusers defaults.
    pub fn default_size(&self) -> usize {
        self.unet.config.sample_size.unwrap_or(64) * self.vae.config.scale_factor()
    }

    pub fn default_scheduler(&self) -> Result<SchedulerKind> {
        Ok(self.scheduler_config.default_kind()?)
    }

    /// Text states `[B, 77, D]`: `[uncond, cond]` with guidance, else `[cond]`. Returns
    /// warnings for truncated prompts.
    fn encode_prompt(&self, prompt: &str, negative: &str, guided: bool) -> Result<(Tensor<3>, Vec<String>)> {
        let mut warnings = Vec::new();
        let mut tokenize = |label: &str, text: &str| -> Result<Vec<u32>> {
            let tokens = self.tokenizer.encode(text)?;
            if tokens.dropped > 0 {
                warnings.push(format!(
                    "the {label} is longer than CLIP's {} tokens: its last {} tokens were dropped",
                    self.tokenizer.max_length - 2,
                    tokens.dropped
                ));
            }
            Ok(tokens.ids)
        };
        let cond = tokenize("prompt", prompt)?;
        let ids = if guided { vec![tokenize("negative prompt", negative)?, cond] } else { vec![cond] };
        Ok((self.text_encoder.forward(&ids), warnings))
    }

    /// Validates `req`, encodes the prompt and prepares the initial latents.
    pub fn start(&self, req: Request) -> Result<Denoising> {
        let multiple = self.size_multiple();
        let f = self.vae.config.scale_factor();
        let latent_dim = |axis: usize| req.latents.as_ref().and_then(|l| l.shape.get(axis)).map(|d| d * f);
        let width = req.width.or(latent_dim(3)).unwrap_or(self.default_size());
        let height = req.height.or(latent_dim(2)).unwrap_or(self.default_size());
        for (name, v) in [("width", width), ("height", height)] {
            if v == 0 || v % multiple != 0 {
                return Err(Error::Invalid(format!(
                    "{name} {v} is not a positive multiple of {multiple} (the VAE's factor {} × the UNet's down-sampling {})",
                    self.vae.config.scale_factor(),
                    self.unet.config.downsample_factor()
                )));
            }
        }
        let steps = req.steps.unwrap_or(DEFAULT_STEPS);
        let guidance = req.guidance.unwrap_or(DEFAULT_GUIDANCE);
        if !guidance.is_finite() {
            return Err(Error::Invalid(format!("guidance scale {guidance} is not a number")));
        }
        let kind = match req.scheduler {
            Some(kind) => kind,
            None => self.default_scheduler()?,
        };
        let scheduler = schedulers::build(kind, &self.scheduler_config, steps)?;

        let shape = [1, self.unet.config.in_channels, height / f, width / f];
        let mut rng = NormalRng::new(req.seed);
        let latents = match req.latents {
            Some(given) if given.shape == shape => given.values,
            Some(given) => {
                return Err(Error::Invalid(format!("initial latents have shape {:?}; {width}x{height} needs {shape:?}", given.shape)));
            }
            None => rng.normals(shape.iter().product()),
        };
        let latents = Tensor::<4>::from_data(TensorData::new(latents, shape), &self.device).mul_scalar(scheduler.init_noise_sigma());

        // diffusers guides only above 1; SD-Turbo and LCM run at 0 or 1 with one UNet pass.
        let guided = guidance > 1.0;
        let (context, warnings) = self.encode_prompt(&req.prompt, &req.negative_prompt, guided)?;
        let noise = match req.step_noise {
            Some(queue) => NoiseSource::Given(queue),
            None => NoiseSource::Seeded(rng),
        };
        Ok(Denoising { scheduler, latents, context, guidance, guided, index: 0, noise, shape, warnings, kind, steps, width, height })
    }
}

enum NoiseSource {
    Seeded(NormalRng),
    Given(VecDeque<Vec<f32>>),
}

/// A generation in progress: call [`Denoising::step`] until [`Denoising::finished`], then
/// [`Denoising::decode`]. It holds only state, so a caller can keep it beside the pipeline.
pub struct Denoising {
    scheduler: Box<dyn Scheduler>,
    latents: Tensor<4>,
    context: Tensor<3>,
    guidance: f64,
    guided: bool,
    index: usize,
    noise: NoiseSource,
    shape: [usize; 4],
    /// Messages for the user (e.g. a truncated prompt).
    pub warnings: Vec<String>,
    pub kind: SchedulerKind,
    pub steps: usize,
    pub width: usize,
    pub height: usize,
}

impl Denoising {
    /// UNet calls in total (PNDM makes one more than the step count).
    pub fn total(&self) -> usize {
        self.scheduler.timesteps().len()
    }

    /// UNet calls made so far.
    pub fn done(&self) -> usize {
        self.index
    }

    pub fn finished(&self) -> bool {
        self.index >= self.total()
    }

    /// Runs one UNet call and scheduler update (none once finished). Nothing is read back
    /// from the device here.
    pub fn step(&mut self, pipe: &StableDiffusion) -> Result<()> {
        let Some(&t) = self.scheduler.timesteps().get(self.index) else { return Ok(()) };
        let input = self.scheduler.scale_model_input(self.latents.clone(), self.index);
        let prediction = if self.guided {
            let out = pipe.unet.forward(Tensor::cat(vec![input.clone(), input], 0), t, &self.context);
            let mut halves = out.chunk(2, 0);
            let cond = halves.pop().expect("two halves");
            let uncond = halves.pop().expect("two halves");
            uncond.clone() + (cond - uncond).mul_scalar(self.guidance)
        } else {
            pipe.unet.forward(input, t, &self.context)
        };
        let (shape, device) = (self.shape, pipe.device.clone());
        let mut missing_noise = false;
        let noise = &mut self.noise;
        let mut draw = || {
            let values = match noise {
                NoiseSource::Seeded(rng) => rng.normals(shape.iter().product()),
                NoiseSource::Given(queue) => queue.pop_front().unwrap_or_else(|| {
                    missing_noise = true;
                    vec![0.0; shape.iter().product()]
                }),
            };
            Tensor::<4>::from_data(TensorData::new(values, shape), &device)
        };
        self.latents = self.scheduler.step(prediction, self.index, self.latents.clone(), &mut draw);
        if missing_noise {
            return Err(Error::Invalid("the scheduler drew more step noise than was supplied".into()));
        }
        self.index += 1;
        Ok(())
    }

    /// The final latents, before VAE scaling.
    pub fn latents(&self) -> Tensor<4> {
        self.latents.clone()
    }

    /// Decodes the latents to an image `[1, 3, H, W]` in [0, 1], still on the device.
    pub fn decode(&self, pipe: &StableDiffusion) -> Tensor<4> {
        let vae = &pipe.vae;
        let image = vae.decode(self.latents.clone().div_scalar(vae.config.scaling_factor));
        (image.div_scalar(2.0).add_scalar(0.5)).clamp(0.0, 1.0)
    }
}
