//! The browser's entry point (wasm32 only): the Web Worker drives an [`Engine`] through
//! wasm-bindgen. The worker downloads and caches files; the engine only sees bytes.
//!
//! Weights arrive one tensor at a time ([`Engine::add_tensor`], [`Engine::add_stored`]), so
//! wasm memory never holds a whole weight file: the UNet's and the VAE decoder's go to the GPU
//! as they come; the text encoder's and the VAE encoder's wait as stored bytes until a prompt or
//! an input image needs them (`weights::on_demand`).
mod sha256;

use std::collections::HashMap;

use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};
use wasm_bindgen::prelude::*;

use crate::bench::Components;
use crate::files::MemoryFiles;
use crate::model::autoencoder_tiny::{self, AutoencoderTiny};
use crate::pipeline::image_processor::Image8;
use crate::pipeline::img2img::{self, Img2Img};
use crate::pipeline::infotext::{self, Infotext};
use crate::pipeline::inpaint::{self, Inpaint};
use crate::pipeline::preview::{self, Previewer};
use crate::pipeline::resize::ResizeMode;
use crate::pipeline::upscale::{self, Upscale};
use crate::pipeline::{Job, Mode, Request, Run, StableDiffusion};
use crate::schedulers::SchedulerKind;
use crate::quant::Format;
use crate::weights::{Uploaded, Weights, safetensors_values};

unsafe extern "C" {
    /// The linker's function that runs the static constructors (cubecl registers its IR
    /// through `inventory`).
    fn __wasm_call_ctors();
}

/// Runs once, when the worker instantiates the module. Calling the constructors here, from an
/// export, also tells the linker not to wrap every export in a call to them: it did, and each
/// crossing from JavaScript into wasm (several per GPU launch) re-ran them all, which was most
/// of a step's time in the browser.
#[wasm_bindgen(start)]
fn start() {
    // SAFETY: called once per instance, before any other export touches a registry.
    unsafe { __wasm_call_ctors() };
    console_error_panic_hook::set_once();
    if log::set_logger(&ConsoleLog).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
}

/// Sends the engine's log errors and warnings to the console. A kernel the browser refuses to
/// compile is reported only there (cubecl logs it), and the worker fails the run on it.
struct ConsoleLog;

impl log::Log for ConsoleLog {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::Level::Warn
    }

    fn log(&self, record: &log::Record) {
        let text = JsValue::from(record.args().to_string());
        match record.level() {
            log::Level::Error => web_sys::console::error_1(&text),
            _ => web_sys::console::warn_1(&text),
        }
    }

    fn flush(&self) {}
}

/// The engine's facts about a model's files and the settings' defaults and limits
/// ([`crate::layout::Layout`]): the page's only source of them.
#[wasm_bindgen]
pub fn layout() -> Result<JsValue, JsError> {
    serde_wasm_bindgen::to_value(&crate::layout::Layout::get()).map_err(js_err)
}

fn js_err(e: impl std::fmt::Display) -> JsError {
    JsError::new(&e.to_string())
}

/// A failure of a run in progress as a JavaScript `Error`, named `NonFinite` for NaN or Inf
/// (the model or the settings are at fault, not the engine).
fn run_error(e: crate::Error) -> JsValue {
    let error = js_sys::Error::new(&e.to_string());
    if matches!(e, crate::Error::NonFinite(_)) {
        error.set_name("NonFinite");
    }
    error.into()
}

/// Settings as the page sends them; absent fields take the model's (or the mode's) defaults.
#[derive(Deserialize)]
struct WebRequest {
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
    fn into_job(self) -> Result<Job, JsError> {
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

/// Which pipeline [`Engine::start`] runs, as the page names it.
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

/// What the page needs to lay out its controls for the loaded model.
#[derive(Serialize)]
struct ModelInfo {
    default_size: usize,
    size_multiple: usize,
    /// `None` when the model's own scheduler is not one the engine has.
    default_scheduler: Option<String>,
}

#[derive(Serialize)]
struct Started {
    total: usize,
    width: usize,
    height: usize,
    warnings: Vec<String>,
}

#[wasm_bindgen]
pub struct Engine {
    device: Device,
    files: HashMap<String, Vec<u8>>,
    uploads: HashMap<String, Uploaded>,
    pipe: Option<StableDiffusion>,
    /// The sharp preview's tiny autoencoder, when the page turned it on.
    preview_decoder: Option<AutoencoderTiny>,
    run: Option<Run>,
}

/// The calls of [`Components`] for `scripts/bench-web`, which times them (and counts their
/// GPU dispatches) in JavaScript, as `kiln bench` times them natively.
#[wasm_bindgen]
pub struct Bench {
    components: Components,
}

#[wasm_bindgen]
impl Engine {
    /// The engine on `backend`: `webgpu` (burn's wgpu runtime; fails with the adapter's message
    /// when there is none) or `cpu` (burn's flex backend in this thread).
    pub async fn create(backend: String) -> Result<Engine, JsError> {
        let device = match backend.as_str() {
            "webgpu" => Device::wgpu_options().init_async().await.map_err(|e| js_err(format!("WebGPU could not be initialised: {e}")))?,
            "cpu" => Device::flex(),
            other => return Err(js_err(format!("unknown backend {other:?} (webgpu or cpu)"))),
        };
        Ok(Engine { device, files: HashMap::new(), uploads: HashMap::new(), pipe: None, preview_decoder: None, run: None })
    }

    /// A small file (config, tokenizer) by its repo path, e.g. `unet/config.json`.
    pub fn set_file(&mut self, path: String, bytes: Vec<u8>) {
        self.files.insert(path, bytes);
    }

    /// One tensor of a weight file, kept in its published precision. `stem` names the file
    /// without its extension (`unet/diffusion_pytorch_model`); `dtype` as in the safetensors header.
    pub fn add_tensor(&mut self, stem: String, name: String, dtype: String, shape: Vec<u32>, bytes: &[u8]) -> Result<(), JsError> {
        let shape = shape.into_iter().map(|d| d as usize).collect();
        let device = self.device.clone();
        self.upload(stem).add_safetensors(&name, &dtype, shape, bytes, Format::published(&dtype), &device).map_err(js_err)
    }

    /// One tensor stored in a Kiln format (`f32`, `f16`, `q8`, `q4`): from a package, or
    /// converted earlier by [`Engine::convert`]. Quantized tensors stay quantized on the GPU.
    pub fn add_stored(&mut self, stem: String, name: String, format: String, shape: Vec<u32>, bytes: &[u8]) -> Result<(), JsError> {
        let format = Format::from_name(&format).map_err(js_err)?;
        let shape = shape.into_iter().map(|d| d as usize).collect();
        let device = self.device.clone();
        self.upload(stem).add(&name, shape, format, bytes, &device).map_err(js_err)
    }

    fn upload(&mut self, stem: String) -> &mut Uploaded {
        self.uploads.entry(stem.clone()).or_insert_with(|| Uploaded::new(&stem, &stem))
    }

    /// Whether a safetensors entry of `dtype` is a weight the engine reads (integer buffers
    /// such as CLIP's `position_ids` are not).
    pub fn is_weight_dtype(dtype: String) -> bool {
        crate::weights::is_weight_dtype(&dtype)
    }

    /// The format a tensor is stored in when the model is kept as `format` (norms, biases,
    /// embeddings and the outermost convolutions stay f16; see `quant::Format::for_tensor`).
    pub fn stored_format(name: String, shape: Vec<u32>, format: String) -> Result<String, JsError> {
        let shape: Vec<usize> = shape.into_iter().map(|d| d as usize).collect();
        Ok(Format::from_name(&format).map_err(js_err)?.for_tensor(&name, &shape).name().to_owned())
    }

    /// A safetensors tensor (`dtype` as in its header) encoded in `stored`, the format
    /// [`Engine::stored_format`] chose: the worker caches these bytes instead of the original.
    pub fn convert(name: String, dtype: String, shape: Vec<u32>, bytes: &[u8], stored: String) -> Result<Vec<u8>, JsError> {
        let shape: Vec<usize> = shape.into_iter().map(|d| d as usize).collect();
        let values = safetensors_values(std::path::Path::new("weights"), &name, &dtype, &shape, bytes).map_err(js_err)?;
        Ok(Format::from_name(&stored).map_err(js_err)?.encode(&values))
    }

    /// Builds the pipeline from what was set and uploaded; returns its [`ModelInfo`].
    pub fn finish_load(&mut self, model_name: String) -> Result<JsValue, JsError> {
        self.pipe = None;
        let files = MemoryFiles { name: model_name, files: std::mem::take(&mut self.files) };
        let device = self.device.clone();
        let weights: HashMap<String, Weights> =
            std::mem::take(&mut self.uploads).into_iter().map(|(stem, up)| (stem, Weights::uploaded(up, &device))).collect();
        let pipe = StableDiffusion::assemble(
            &files,
            &|stem| weights.get(stem).cloned().ok_or_else(|| crate::Error::Invalid(format!("{}: no tensors were uploaded for {stem}", files.name))),
            &device,
        )
        .map_err(js_err)?;
        let info = ModelInfo {
            default_size: pipe.default_size(),
            size_multiple: pipe.size_multiple(),
            default_scheduler: pipe.default_scheduler().ok().map(|k| k.name().to_string()),
        };
        self.pipe = Some(pipe);
        serde_wasm_bindgen::to_value(&info).map_err(js_err)
    }

    /// Loads the sharp preview's decoder from a TAESD repo's `config.json` and weight file
    /// (`weight_path`, one of the names `layout().preview_decoder` lists); `name` is the repo.
    pub fn load_preview_decoder(&mut self, name: String, config: Vec<u8>, weight_path: String, weights: Vec<u8>) -> Result<(), JsError> {
        self.preview_decoder = None;
        let files = MemoryFiles { name, files: HashMap::from([(autoencoder_tiny::CONFIG.to_owned(), config), (weight_path, weights)]) };
        self.preview_decoder = Some(AutoencoderTiny::load(&files, &self.device).map_err(js_err)?);
        Ok(())
    }

    /// Goes back to the approximate preview, freeing the decoder.
    pub fn drop_preview_decoder(&mut self) {
        self.preview_decoder = None;
    }

    /// The loaded model's components with the inputs of one step at `size`² with `batch`
    /// latents, for timing; the engine gives the model up.
    pub fn bench(&mut self, size: usize, batch: usize) -> Result<Bench, JsError> {
        let pipe = self.pipe.take().ok_or_else(|| js_err("no model is loaded"))?;
        Ok(Bench { components: Components::from_pipeline(pipe, size, batch).map_err(js_err)? })
    }

    /// A full-size published architecture (`sd15`, `sd-turbo`) with random weights, for timing.
    pub fn bench_random(&self, preset: String, size: usize, batch: usize) -> Result<Bench, JsError> {
        Ok(Bench { components: Components::random(&preset, size, batch, &self.device).map_err(js_err)?.0 })
    }

    /// Validates the settings, encodes the prompt (and the images) and prepares the noise.
    pub fn start(&mut self, request: JsValue) -> Result<JsValue, JsError> {
        self.run = None;
        let pipe = self.pipe.as_ref().ok_or_else(|| js_err("no model is loaded"))?;
        let req: WebRequest = serde_wasm_bindgen::from_value(request).map_err(js_err)?;
        let run = pipe.run(req.into_job()?).map_err(js_err)?;
        let (width, height) = run.size();
        let misfit = self.preview_decoder.as_ref().and_then(|decoder| preview::misfit(decoder, pipe));
        let started = Started { total: run.total(), width, height, warnings: run.warnings().iter().cloned().chain(misfit).collect() };
        self.run = Some(run);
        serde_wasm_bindgen::to_value(&started).map_err(js_err)
    }

    /// Queues one denoising step; returns how many are done.
    pub fn step(&mut self) -> Result<usize, JsError> {
        let (Some(pipe), Some(run)) = (self.pipe.as_ref(), self.run.as_mut()) else { return Err(js_err("nothing is being generated")) };
        run.step(pipe).map_err(js_err)?;
        Ok(run.done())
    }

    pub fn finished(&self) -> bool {
        self.run.as_ref().is_none_or(Run::finished)
    }

    /// Resolves once the GPU has caught up with the queued steps (an 8-byte readback), so
    /// progress is real and a cancel lands within one step; rejects on NaN or Inf. With
    /// `preview`, resolves to the image as it forms (`{ width, height, rgba }`: by the sharp
    /// preview's decoder when one is loaded and fits the model, else one pixel per latent
    /// pixel when the latent space has RGB factors), else to `undefined`.
    pub fn wait(&self, preview: bool) -> js_sys::Promise {
        let probe = self.run.as_ref().map(|run| run.probe(preview.then(|| self.previewer())));
        wasm_bindgen_futures::future_to_promise(async move {
            let Some(probe) = probe else { return Ok(JsValue::UNDEFINED) };
            let values = read_back(probe.tensor.clone()).await?;
            probe.check(&values).map_err(run_error)?;
            // Built by hand: serde would send the pixels as a plain array, not a typed one.
            Ok(probe.preview(&values).map_or(JsValue::UNDEFINED, |p| {
                let object = js_sys::Object::new();
                for (key, value) in [("width", JsValue::from(p.width)), ("height", p.height.into()), ("rgba", js_sys::Uint8ClampedArray::from(p.rgba.as_slice()).into())] {
                    js_sys::Reflect::set(&object, &key.into(), &value).expect("a plain object takes any key");
                }
                object.into()
            }))
        })
    }

    /// Drops the generation in progress.
    pub fn cancel(&mut self) {
        self.run = None;
    }

    /// Decodes the image and resolves to PNG bytes carrying the generation parameters.
    pub fn finish(&mut self) -> Result<js_sys::Promise, JsError> {
        let (Some(pipe), Some(run)) = (self.pipe.as_ref(), self.run.take()) else { return Err(js_err("nothing is being generated")) };
        let image = run.decode(pipe);
        Ok(wasm_bindgen_futures::future_to_promise(async move {
            let values = read_back(image).await?;
            let bytes = run.png(&values).map_err(run_error)?;
            Ok(js_sys::Uint8Array::from(bytes.as_slice()).into())
        }))
    }
}

impl Engine {
    /// The sharp preview when its decoder is loaded and fits the model, else the approximation.
    fn previewer(&self) -> Previewer<'_> {
        match (&self.preview_decoder, &self.pipe) {
            (Some(decoder), Some(pipe)) if preview::misfit(decoder, pipe).is_none() => Previewer::Tiny(decoder),
            _ => Previewer::Approx,
        }
    }
}

/// The settings a PNG's `parameters` text carries (Kiln's or Automatic1111's), as
/// `infotext::Settings`; fails when the file is no PNG or carries no such text.
#[wasm_bindgen]
pub fn png_info(bytes: &[u8]) -> Result<JsValue, JsError> {
    let text = infotext::read_png(bytes).map_err(js_err)?.ok_or_else(|| js_err("this PNG carries no generation parameters (Kiln and Automatic1111 write them)"))?;
    serde_wasm_bindgen::to_value(&Infotext::parse(&text).settings()).map_err(js_err)
}

#[wasm_bindgen]
impl Bench {
    /// Runs `component` (`text_encoder`, `unet` or `vae_decode`) once; resolves when the device
    /// has finished it (one value read back, as `kiln bench` waits).
    pub fn call(&self, component: String) -> Result<js_sys::Promise, JsError> {
        let probe = match component.as_str() {
            "text_encoder" => self.components.text_encoder_call().flatten::<1>(0, 2),
            "unet" => self.components.unet_call().flatten::<1>(0, 3),
            "vae_decode" => self.components.vae_decode().flatten::<1>(0, 3),
            other => return Err(js_err(format!("no component {other:?}"))),
        };
        Ok(read_f32(probe.narrow(0, 0, 1)))
    }

    /// The timestep of every timed UNet call.
    pub fn timestep() -> f64 {
        crate::bench::TIMESTEP
    }

    /// The UNet call's input latents, flattened (the ONNX Runtime peer's `sample`).
    pub fn sample(&self) -> Vec<f32> {
        self.components.sample.clone()
    }

    pub fn sample_shape(&self) -> Vec<u32> {
        self.components.sample_shape.iter().map(|&d| d as u32).collect()
    }

    /// The UNet call's text states, flattened (`encoder_hidden_states`).
    pub fn context(&self) -> Vec<f32> {
        self.components.context.clone()
    }

    pub fn context_shape(&self) -> Vec<u32> {
        self.components.context_shape.iter().map(|&d| d as u32).collect()
    }

    /// The UNet call's output values, for the check against ONNX Runtime.
    pub fn unet_output(&self) -> js_sys::Promise {
        read_f32(self.components.unet_call().flatten::<1>(0, 3))
    }
}

/// Resolves to a tensor's values as a `Float32Array`.
fn read_f32(tensor: Tensor<1>) -> js_sys::Promise {
    wasm_bindgen_futures::future_to_promise(async move { Ok(js_sys::Float32Array::from(read_back(tensor).await?.as_slice()).into()) })
}

/// A tensor's values on the host, once the device has computed them.
async fn read_back(tensor: Tensor<1>) -> Result<Vec<f32>, JsValue> {
    let data = tensor.into_data_async().await.map_err(|e| JsValue::from(js_err(crate::Error::gpu(e))))?;
    data.try_to_vec::<f32>().map_err(|e| JsValue::from(js_err(format!("{e:?}"))))
}
