//! Stable Diffusion as diffusers' pipelines run it, driven one step at a time so a caller (CLI
//! loop, browser worker) can report progress and cancel between steps. Text-to-image is here;
//! `img2img`, `inpaint` and `upscale` prepare their own latents and conditioning and then share
//! the same [`Denoising`] loop.
mod buffers;
pub mod family;
pub mod image_processor;
pub mod img2img;
pub mod infotext;
pub mod inpaint;
pub mod job;
pub mod latent_upscale;
pub mod png;
pub mod preview;
pub mod prompt;
pub mod resize;
pub mod rng;
pub mod text;
pub mod tiles;
pub mod upscale;

pub use job::{Job, Mode, Probe, Run};

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};

use burn::tensor::{Device, Tensor, TensorData};

use crate::error::{Error, Result};
use crate::files::{Folder, ModelFiles, json, short_name};
use crate::lora::Loras;
use crate::model::unet::{AddedConditioning, UNet2DConditionModel};
use crate::model::vae::AutoencoderKL;
use crate::package;
use crate::quant::Format;
use crate::schedulers::{self, Scheduler, SchedulerConfig, SchedulerKind};
use crate::weights::{Uploaded, Weights};
use buffers::Footprint;
use family::{Conditioner, Family, ModelIndex};
use rng::NormalRng;
pub use text::TextStates;
use text::TextEncoder;

pub struct StableDiffusion {
    /// The model's short name, written into PNG metadata.
    pub name: String,
    pub family: &'static Family,
    /// The family's text encoders, in its order.
    pub text_encoders: Vec<TextEncoder>,
    /// The last encoding, reused while the prompts stay the same (a new seed, say).
    last_prompt: Mutex<Option<(PromptKey, TextStates)>>,
    pub unet: UNet2DConditionModel,
    /// What the UNet takes besides the text.
    conditioner: Conditioner,
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
    /// Seeds every noise draw; `None` only when `latents` are given and nothing else is drawn
    /// (the PNG then records no seed; draws that happen anyway use 0).
    pub seed: Option<u64>,
    /// Initial noise `[1, C, H/f, W/f]`, unscaled standard normal, instead of the seed's;
    /// its shape sets the size when width or height is not given.
    pub latents: Option<crate::npy::Array>,
    /// Noise for the schedulers that draw it while stepping, in order; for parity with
    /// diffusers given the same draws. `None` continues the seed's stream.
    pub step_noise: Option<VecDeque<Vec<f32>>>,
}

/// Prompt, negative prompt, and whether both are encoded (guidance).
type PromptKey = (String, String, bool);

pub const DEFAULT_STEPS: usize = 50;
pub const DEFAULT_GUIDANCE: f64 = 7.5;

impl StableDiffusion {
    /// Loads a diffusers pipeline laid out as published repos are, each weight file converted
    /// once to `format` as it loads (`None`: as published; see [`Uploaded::from_file`]), with
    /// `loras` merged in first. The tensors are held as a package's are, so the text encoder and
    /// the VAE's encoder wait on the host in that form, and nothing else of their files does.
    pub fn load(files: &dyn ModelFiles, format: Option<Format>, loras: &Arc<Loras>, device: &Device) -> Result<Self> {
        Self::assemble(files, &|stem| Ok(Weights::uploaded(Uploaded::from_file(files, stem, format, loras, device)?, device)), loras, device)
    }

    /// Builds the pipeline from `files` (configs, tokenizer) and `weights`, which maps a
    /// weight file's stem (`unet/diffusion_pytorch_model`) to its tensors, uploaded with
    /// `loras` merged in; fails when a LoRA has layers the model lacks.
    pub fn assemble(files: &dyn ModelFiles, weights: &dyn Fn(&str) -> Result<Weights>, loras: &Loras, device: &Device) -> Result<Self> {
        let index = ModelIndex::read(files)?;
        let family = Family::of(&index, &files.name())?;
        let text_encoders = family.text_encoders.iter().map(|folders| TextEncoder::load(files, folders, weights(&folders.weights())?)).collect::<Result<_>>()?;
        let unet = UNet2DConditionModel::load(&weights("unet/diffusion_pytorch_model")?, json(files, "unet/config.json")?)?;
        let conditioner = family.conditioner(files, &index, &unet.config)?;
        let vae = AutoencoderKL::load(&weights("vae/diffusion_pytorch_model")?, json(files, "vae/config.json")?)?;
        let scheduler_config = SchedulerConfig::from_json(&files.require_text("scheduler/scheduler_config.json")?)?;
        loras.check_all_merged()?;
        device.memory_cleanup();
        let last_prompt = Mutex::default();
        Ok(Self { name: short_name(files), family, text_encoders, last_prompt, unet, conditioner, vae, scheduler_config, device: device.clone() })
    }

    /// Loads a Kiln package (a folder with `manifest.json`) as it is stored, or a diffusers
    /// folder with its weights converted to `format` as they load (`None`: as published);
    /// `loras` are merged in either way.
    pub fn open(dir: &Path, format: Option<Format>, loras: &Arc<Loras>, device: &Device) -> Result<Self> {
        let folder = Folder(dir.to_owned());
        if folder.read(package::MANIFEST)?.is_none() {
            return Self::load(&folder, format, loras, device);
        }
        let loaded = package::load(&folder, loras, device)?;
        if let Some(format) = format.filter(|&f| f != loaded.format) {
            return Err(Error::Invalid(format!("{}: a {} package cannot be loaded as {}; pack the original again", dir.display(), loaded.format.name(), format.name())));
        }
        let missing = |stem: &str| Error::Invalid(format!("{}: the package has no tensors of {stem}", dir.display()));
        Self::assemble(&loaded.files, &|stem| loaded.weights.get(stem).cloned().ok_or_else(|| missing(stem)), loras, device)
    }

    pub fn device(&self) -> &Device {
        &self.device
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

    /// The prompts' text states ([`text::encode`]), the last ones again for the same prompts.
    fn encode_prompt(&self, prompt: &str, negative: &str, guided: bool) -> Result<TextStates> {
        let key = (prompt.to_owned(), negative.to_owned(), guided);
        let mut last = self.last_prompt.lock().expect("no panic while encoding");
        if let Some((_, states)) = last.as_ref().filter(|(k, _)| *k == key) {
            return Ok(states.clone());
        }
        let empty = match self.conditioner {
            Conditioner::TextTime { force_zeros_for_empty_prompt: true } => text::Negative::ZerosWhenEmpty,
            _ => text::Negative::Encoded,
        };
        let states = text::encode(&self.text_encoders, prompt, negative, guided, empty)?;
        self.device.memory_cleanup();
        *last = Some((key, states.clone()));
        Ok(states)
    }

    /// Validates `req`, encodes the prompt and prepares the initial latents.
    pub fn start(&self, req: Request) -> Result<Denoising> {
        self.require_unet("text-to-image", self.latent_channels())?;
        let f = self.vae.config.scale_factor();
        let latent_dim = |axis: usize| req.latents.as_ref().and_then(|l| l.shape.get(axis)).map(|d| d * f);
        let width = req.width.or(latent_dim(3)).unwrap_or(self.default_size());
        let height = req.height.or(latent_dim(2)).unwrap_or(self.default_size());
        self.check_size("", width, height)?;
        let mut setup = self.setup(&req, DEFAULT_STEPS, self.family.guidance, self.image_footprint(width, height, false))?;
        let noise = setup.normals(req.latents, self.latent_shape(width, height), "initial latents")?;
        let latents = noise.mul_scalar(setup.scheduler.init_noise_sigma());
        Ok(setup.denoising(latents, 0, Conditioning::default(), req.step_noise, width, height))
    }

    /// Channels of the latents the VAE makes, which the UNet predicts.
    fn latent_channels(&self) -> usize {
        self.vae.config.latent_channels
    }

    /// Refuses a checkpoint made for another mode: the upscaler's family, and what diffusers
    /// tells by the UNet's input channels (4 plain, 9 inpainting).
    fn require_unet(&self, mode: &str, in_channels: usize) -> Result<()> {
        let config = &self.unet.config;
        let what = if let Conditioner::NoiseLevel(_) = self.conditioner {
            format!("{} (its UNet takes the low-resolution image and a noise level): use `kiln upscale`", self.family.name)
        } else if let Conditioner::LatentUpscale = self.conditioner {
            format!("{} (its UNet takes an image's latents): use `kiln upscale`", self.family.name)
        } else if config.in_channels == in_channels {
            return Ok(());
        } else if config.in_channels == 2 * self.latent_channels() + 1 {
            "an inpainting model (its UNet also takes a mask and the masked image): use `kiln inpaint`".to_string()
        } else {
            format!("a UNet with {} input channels", config.in_channels)
        };
        Err(Error::Invalid(format!("{}: {mode} needs a UNet with {in_channels} input channels; this is {what}", self.name)))
    }

    /// Sizes must be positive multiples of [`Self::size_multiple`]; `what` names the image.
    fn check_size(&self, what: &str, width: usize, height: usize) -> Result<()> {
        let multiple = self.size_multiple();
        for (name, v) in [("width", width), ("height", height)] {
            if v == 0 || v % multiple != 0 {
                return Err(Error::Invalid(format!(
                    "{what}{name} {v} is not a positive multiple of {multiple} (the VAE's factor {} × the UNet's down-sampling {})",
                    self.vae.config.scale_factor(),
                    self.unet.config.downsample_factor()
                )));
            }
        }
        Ok(())
    }

    /// How a run that makes (and with `encodes_image`, starts from) a `width` × `height` image
    /// uses GPU buffers.
    fn image_footprint(&self, width: usize, height: usize, encodes_image: bool) -> Footprint {
        let multiple = self.size_multiple();
        Footprint { width, height, multiple, latent_step: self.vae.config.scale_factor(), output_scale: 1, tile: None, encodes_image }
    }

    /// What every mode does first: checks the settings and that `size` fits the device, builds
    /// the scheduler and encodes the prompt.
    fn setup(&self, req: &Request, default_steps: usize, default_guidance: f64, size: Footprint) -> Result<Setup> {
        let steps = req.steps.unwrap_or(default_steps);
        let guidance = req.guidance.unwrap_or(default_guidance);
        if !guidance.is_finite() {
            return Err(Error::Invalid(format!("guidance scale {guidance} is not a number")));
        }
        // diffusers guides only above 1; SD-Turbo and LCM run at 0 or 1 with one UNet pass.
        let guided = guidance > 1.0;
        self.check_buffers(&size, if guided { 2 } else { 1 })?;
        let kind = match req.scheduler {
            Some(kind) => kind,
            None => self.default_scheduler()?,
        };
        let scheduler = schedulers::build(kind, &self.scheduler_config, steps)?;
        let text = self.encode_prompt(&req.prompt, &req.negative_prompt, guided)?;
        let time_ids = matches!(self.conditioner, Conditioner::TextTime { .. });
        Ok(Setup { scheduler, kind, steps, guidance, text, time_ids, warnings: Vec::new(), rng: NormalRng::new(req.seed.unwrap_or(0)), device: self.device.clone() })
    }

    /// Encodes `image` `[1, 3, H, W]` in [-1, 1] to scaled latents as diffusers'
    /// `retrieve_latents(vae.encode(image), generator)` does: a sample of the latent
    /// distribution, mean + std × `noise`.
    fn encode_image(&self, image: Tensor<4>, noise: Tensor<4>) -> Result<Tensor<4>> {
        let (mean, logvar) = self.vae.encode(image)?;
        self.device.memory_cleanup();
        Ok((mean + logvar.mul_scalar(0.5).exp() * noise).mul_scalar(self.vae.config.scaling_factor))
    }

    /// `[1, C, h, w]` latent shape of a `width`×`height` image.
    fn latent_shape(&self, width: usize, height: usize) -> [usize; 4] {
        let f = self.vae.config.scale_factor();
        [1, self.latent_channels(), height / f, width / f]
    }
}

/// A validated request's shared state, before the mode-specific latents exist.
struct Setup {
    scheduler: Box<dyn Scheduler>,
    kind: SchedulerKind,
    steps: usize,
    guidance: f64,
    text: TextStates,
    /// SDXL: the UNet also takes the output's size ([`AddedConditioning::time_ids`]).
    time_ids: bool,
    warnings: Vec<String>,
    rng: NormalRng,
    device: Device,
}

impl Setup {
    /// Standard normals shaped `shape`: `given` (checked) for parity with diffusers' draws, else
    /// the seed's next ones. `what` names them in errors.
    fn normals(&mut self, given: Option<crate::npy::Array>, shape: [usize; 4], what: &str) -> Result<Tensor<4>> {
        let values = match given {
            Some(given) if given.values.iter().any(|v| !v.is_finite()) => return Err(Error::NonFinite(format!("in the given {what}"))),
            Some(given) if given.shape == shape => given.values,
            Some(given) => return Err(Error::Invalid(format!("{what} have shape {:?}; this image needs {shape:?}", given.shape))),
            None => self.rng.normals(shape.iter().product()),
        };
        Ok(Tensor::<4>::from_data(TensorData::new(values, shape), &self.device))
    }

    /// Starts the loop at call `begin` from `latents`, making a `width` × `height` image; step
    /// noise continues the seed's stream unless `step_noise` supplies it.
    fn denoising(self, latents: Tensor<4>, begin: usize, mut conditioning: Conditioning, step_noise: Option<VecDeque<Vec<f32>>>, width: usize, height: usize) -> Denoising {
        if self.time_ids {
            conditioning.added = AddedConditioning::time_ids(width, height);
        }
        let noise = match step_noise {
            Some(queue) => NoiseSource::Given(queue),
            None => NoiseSource::Seeded(self.rng),
        };
        Denoising {
            shape: latents.dims(),
            scheduler: self.scheduler,
            latents,
            text: self.text,
            guidance: self.guidance,
            begin,
            index: begin,
            noise,
            conditioning,
            last: None,
            warnings: self.warnings,
            kind: self.kind,
            steps: self.steps,
            width,
            height,
        }
    }
}

enum NoiseSource {
    Seeded(NormalRng),
    Given(VecDeque<Vec<f32>>),
}

/// What the UNet sees besides the latents, and what is re-imposed after each step; text-to-image
/// uses none of it.
#[derive(Default)]
struct Conditioning {
    /// Channels concatenated after the scaled latents `[1, C', h, w]` (inpainting's mask and
    /// masked-image latents, the upscaler's noisy low-resolution image).
    extra_channels: Option<Tensor<4>>,
    /// What the family adds to the UNet's time embedding (the upscaler's noise level, SDXL's
    /// time ids).
    added: AddedConditioning,
    /// Inpainting with a plain 4-channel UNet.
    blend: Option<MaskBlend>,
    /// Overlapping windows the UNet and the VAE decoder run on one at a time (upscaling).
    tiles: Option<tiles::Tiles>,
    /// The UNet is wrapped as k-diffusion's denoiser (the latent upscaler,
    /// [`latent_upscale::Preconditioning`]).
    k_diffusion: bool,
}

/// After each step the kept region is reset to the init image's latents noised to the next
/// timestep: `latents = (1 - mask) * add_noise(image_latents, noise, next) + mask * latents`.
struct MaskBlend {
    /// 1 = repaint, 0 = keep, broadcast over the latent channels.
    mask: Tensor<4>,
    image_latents: Tensor<4>,
    /// The initial noise, reused at every step as diffusers does.
    noise: Tensor<4>,
}

/// A generation in progress: call [`Denoising::step`] until [`Denoising::finished`], then
/// [`Denoising::decode`]. It holds only state, so a caller can keep it beside the pipeline.
pub struct Denoising {
    scheduler: Box<dyn Scheduler>,
    latents: Tensor<4>,
    text: TextStates,
    guidance: f64,
    /// The first call's index into the scheduler's timesteps (img2img starts part-way).
    begin: usize,
    /// The next call's index.
    index: usize,
    noise: NoiseSource,
    shape: [usize; 4],
    conditioning: Conditioning,
    /// The last call's index, latents before it and prediction, for [`Denoising::denoised`].
    last: Option<(usize, Tensor<4>, Tensor<4>)>,
    /// Messages for the user (a resized input image, steps raised to run at all).
    pub warnings: Vec<String>,
    pub kind: SchedulerKind,
    /// Inference steps the schedule was made for; img2img runs only the last part of them.
    pub steps: usize,
    pub width: usize,
    pub height: usize,
}

impl Denoising {
    /// UNet calls in total (PNDM makes one more than the step count).
    pub fn total(&self) -> usize {
        self.scheduler.timesteps().len() - self.begin
    }

    /// UNet calls made so far.
    pub fn done(&self) -> usize {
        self.index - self.begin
    }

    pub fn finished(&self) -> bool {
        self.index >= self.scheduler.timesteps().len()
    }

    /// The guidance scale in use (the request's, else the mode's default).
    pub fn guidance(&self) -> f64 {
        self.guidance
    }

    /// Runs one UNet call and scheduler update (none once finished). Nothing is read back
    /// from the device here.
    pub fn step(&mut self, pipe: &StableDiffusion) -> Result<()> {
        let Some(&t) = self.scheduler.timesteps().get(self.index) else { return Ok(()) };
        let preconditioning = self.conditioning.k_diffusion.then(|| latent_upscale::Preconditioning::at(self.scheduler.as_ref(), self.index));
        let t = preconditioning.as_ref().map_or(t, |p| p.unet_timestep());
        let input = self.scheduler.scale_model_input(self.latents.clone(), self.index);
        let input = match &self.conditioning.extra_channels {
            Some(extra) => Tensor::cat(vec![input, extra.clone()], 1),
            None => input,
        };
        let prediction = match &self.conditioning.tiles {
            Some(tiles) => tiles.blend(input, |window| self.predict(pipe, window, t)),
            None => self.predict(pipe, input, t),
        };
        let prediction = match preconditioning {
            Some(p) => p.denoised(prediction, self.latents.clone()),
            None => prediction,
        };
        self.last = Some((self.index, self.latents.clone(), prediction.clone()));
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
        if let Some(blend) = &self.conditioning.blend {
            let kept = if self.index < self.scheduler.timesteps().len() {
                self.scheduler.add_noise(blend.image_latents.clone(), blend.noise.clone(), self.index)
            } else {
                blend.image_latents.clone()
            };
            self.latents = blend.mask.clone().neg().add_scalar(1.0) * kept + blend.mask.clone() * self.latents.clone();
        }
        Ok(())
    }

    /// The UNet's prediction for `input` (latents and extra channels) at timestep `t`.
    fn predict(&self, pipe: &StableDiffusion, input: Tensor<4>, t: f64) -> Tensor<4> {
        predict(&pipe.unet, input, t, &self.text, self.conditioning.added, self.guidance)
    }

    /// The clean latents the last step's prediction implies (none before the first step).
    pub fn denoised(&self) -> Option<Tensor<4>> {
        let (index, sample, prediction) = self.last.clone()?;
        Some(preview::denoised(self.scheduler.as_ref(), index, sample, prediction))
    }

    /// The final latents, before VAE scaling.
    pub fn latents(&self) -> Tensor<4> {
        self.latents.clone()
    }

    /// Decodes the latents to an image `[1, 3, H, W]` mapped to [0, 1] (not yet clamped, so
    /// NaN and Inf stay visible), still on the device.
    pub fn decode(&self, pipe: &StableDiffusion) -> Tensor<4> {
        decode_latents(&pipe.vae, self.latents.clone(), self.conditioning.tiles.as_ref())
    }
}

/// The UNet's prediction for `input` at timestep `t`; with both prompts' states,
/// classifier-free guided: `uncond + guidance × (cond − uncond)`.
pub fn predict(unet: &UNet2DConditionModel, input: Tensor<4>, t: f64, text: &TextStates, added: AddedConditioning, guidance: f64) -> Tensor<4> {
    let (uncond, cond) = match text {
        TextStates::Single(text) => return unet.forward(input, t, text, added),
        TextStates::Paired(text) => {
            let mut halves = unet.forward(Tensor::cat(vec![input.clone(), input], 0), t, text, added).chunk(2, 0);
            let cond = halves.pop().expect("two halves");
            (halves.pop().expect("two halves"), cond)
        }
        TextStates::Separate { negative, prompt } => (unet.forward(input.clone(), t, negative, added), unet.forward(input, t, prompt, added)),
    };
    uncond.clone() + (cond - uncond).mul_scalar(guidance)
}

/// Scaled latents to an image `[1, 3, H, W]` mapped to [0, 1], unclamped ([`png::to_rgb8`]
/// clamps): decoded in `tiles` (the upscaler's) when its windows fit one GPU binding, else in
/// windows that do when the image is too large to decode at once, else whole.
pub fn decode_latents(vae: &AutoencoderKL, latents: Tensor<4>, tiles: Option<&tiles::Tiles>) -> Tensor<4> {
    let latents = latents.div_scalar(vae.config.scaling_factor);
    let [_, _, h, w] = latents.dims();
    let max_binding = crate::device::max_binding_bytes(&latents.device());
    let given = tiles.filter(|t| t.fit_decoder(&vae.config, max_binding));
    let fitted = given.is_none().then(|| tiles::Tiles::for_vae_decode(&vae.config, w, h, max_binding)).flatten();
    let image = match given.or(fitted.as_ref()) {
        Some(tiles) => tiles.decode(latents, vae.config.scale_factor(), |window| vae.decode(window)),
        None => vae.decode(latents),
    };
    image.div_scalar(2.0).add_scalar(0.5)
}
