//! `kiln`: the command-line face of the engine (generation, image editing, upscaling and benchmarks).
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use burn::tensor::{Device, Tensor};
use clap::{Parser, Subcommand, ValueEnum};

use kiln::lora::Loras;
use kiln::pipeline::image_processor::Image8;
use kiln::pipeline::img2img::{self, Img2Img};
use kiln::pipeline::infotext::{self, Infotext};
use kiln::pipeline::inpaint::{self, Inpaint};
use kiln::pipeline::resize::ResizeMode;
use kiln::pipeline::tiles::TileSize;
use kiln::pipeline::upscale::{self, ImageLatents, Upscale};
use kiln::pipeline::{Job, Mode, Request, StableDiffusion};
use kiln::quant::Format;
use kiln::schedulers::SchedulerKind;
use kiln::{Error, Result, npy};

/// The command line's own parts: timing (`kiln bench`) and models given by URL.
mod cli {
    pub mod bench;
    pub mod download;
    pub mod host;
    pub mod lora;
    pub mod output;
}

use cli::output::Output;
use cli::{bench, download};

#[derive(Parser)]
#[command(name = "kiln", version, about = "Stable Diffusion on burn + wgpu")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Backend {
    /// The GPU through wgpu (Vulkan, Metal, DX12; Mesa lavapipe on machines without one).
    Wgpu,
    /// burn's portable CPU backend.
    Cpu,
}

/// Test-only: caps the GPU's `maxStorageBufferBindingSize` and `maxBufferSize` at this many
/// KiB, so that a test plays a small adapter.
const MAX_BINDING_VAR: &str = "KILN_TEST_MAX_BINDING_KIB";

impl Backend {
    fn device(self) -> Result<Device> {
        match self {
            Backend::Wgpu => match std::env::var(MAX_BINDING_VAR) {
                Ok(kib) => {
                    let kib: u64 = kib.parse().map_err(|_| Error::Invalid(format!("{MAX_BINDING_VAR}={kib} is not a whole number of KiB")))?;
                    futures_lite::future::block_on(kiln::device::capped_gpu(kib << 10)).map_err(|e| Error::Invalid(format!("no wgpu device with {MAX_BINDING_VAR}={kib}: {e}")))
                }
                Err(_) => Ok(Device::wgpu_options().init().unwrap_or_else(|e| {
                    eprintln!("warning: no wgpu device ({e}); using the CPU backend");
                    Device::flex()
                })),
            },
            Backend::Cpu => Ok(Device::flex()),
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Text to image.
    Generate(GenerateArgs),
    /// Image to image: repaint an init image, keeping its composition (StableDiffusionImg2ImgPipeline).
    Img2img(Img2ImgArgs),
    /// Repaint the white part of a mask (StableDiffusionInpaintPipeline).
    Inpaint(InpaintArgs),
    /// Four times the resolution with the Stable Diffusion x4 upscaler (StableDiffusionUpscalePipeline),
    /// or twice with the latent x2 upscaler (StableDiffusionLatentUpscalePipeline).
    Upscale(UpscaleArgs),
    /// Convert a diffusers pipeline into a Kiln package (manifest.json + verified shards).
    Pack {
        /// The diffusers pipeline folder.
        #[arg(long)]
        model: PathBuf,
        /// The package folder to write.
        #[arg(long)]
        out: PathBuf,
        /// f32, f16, q8 or q4 (per-block symmetric; norms, biases, embeddings and the outermost convolutions stay f16).
        #[arg(long, default_value = "q8")]
        format: String,
    },
    /// Print the generation parameters a PNG carries (made by Kiln or Automatic1111).
    Info {
        file: PathBuf,
        /// One JSON object: `prompt`, `negative_prompt`, and every settings field under its own
        /// name (`Steps`, `Sampler`, `CFG scale`, `Seed`, `Size`, …), values as strings as written.
        #[arg(long)]
        json: bool,
    },
    /// Time full-size SD 1.5 / SD-Turbo / SDXL-Turbo with random weights (no download); prints JSON.
    Bench {
        /// sd15, sd-turbo, sdxl-turbo or all.
        #[arg(long, default_value = "all")]
        model: String,
        /// Image size in pixels (square); lavapipe needs small ones.
        #[arg(long, default_value_t = 128)]
        size: usize,
        /// UNet batch (2 = one guided step).
        #[arg(long, default_value_t = 2)]
        batch: usize,
        #[arg(long, default_value_t = 1)]
        iters: usize,
        #[arg(long, value_enum, default_value = "wgpu")]
        backend: Backend,
        /// Compare stored weight formats instead (e.g. f32,f16,q8,q4; the first is the reference):
        /// package bytes, peak GPU memory and error of one guided generation of --model.
        #[arg(long, value_delimiter = ',')]
        formats: Vec<String>,
        /// Denoising steps of the --formats generation.
        #[arg(long, default_value_t = 2)]
        steps: usize,
        /// Guidance of the --formats generation; 1 or less runs one UNet pass a step (SDXL-Turbo: 0).
        #[arg(long, default_value_t = kiln::pipeline::DEFAULT_GUIDANCE)]
        guidance: f64,
        /// Writes the first format's figures and outputs here (how each format's run answers).
        #[arg(long, hide = true)]
        outputs: Option<PathBuf>,
    },
}

/// The settings every mode takes.
#[derive(clap::Args)]
struct CommonArgs {
    /// A diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)
    /// or a Kiln package folder (manifest.json + shards, from `kiln pack`), or either's http(s) URL
    /// (fetched once into ~/.cache/kiln/models).
    #[arg(long)]
    model: PathBuf,
    /// Convert a diffusers folder's weights as they load: f32, f16, q8 or q4 [default: as stored].
    #[arg(long)]
    weights: Option<String>,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// Denoising steps [default: 50; upscale: 75]. img2img and inpaint run strength × steps of them.
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance scale; 1 or less skips the unconditional pass [default: 7.5; upscale: 9].
    #[arg(long)]
    guidance: Option<f64>,
    /// ddim, pndm, euler, euler-a, dpmpp-2m, dpmpp-2m-karras or lcm [default: the model's own].
    #[arg(long)]
    scheduler: Option<String>,
    /// Seed of every noise draw (initial noise, VAE sampling, ancestral steps) [default: random].
    #[arg(long)]
    seed: Option<u64>,
    /// Initial noise as float32 .npy `[1, C, h, w]`, unscaled standard normal, instead of the seed's
    /// (for generate what diffusers calls `latents=`; for img2img the noise added to the image; for
    /// the latent x2 upscaler `[1, 4, 2H/8, 2W/8]` of an H×W image).
    #[arg(long)]
    latents: Option<PathBuf>,
    /// The PNG to write; with --count N, OUT-1.png … OUT-N.png.
    #[arg(long)]
    out: PathBuf,
    /// Also write the latents each image was decoded from, as float32 .npy (numbered as --out),
    /// for `kiln upscale --image-latents` to upscale in latent space.
    #[arg(long)]
    save_latents: Option<PathBuf>,
    /// Images to make one after another, with seeds s, s+1, … (A1111's batch count).
    #[arg(long, default_value_t = 1)]
    count: u64,
    #[arg(long, value_enum, default_value = "wgpu")]
    backend: Backend,
    /// A LoRA merged into the model: a kohya/A1111 or diffusers/PEFT .safetensors file or its
    /// URL, and the scale diffusers' fuse_lora(lora_scale=…) takes [default weight: 1]; repeatable.
    #[arg(long = "lora", value_name = "FILE_OR_URL:WEIGHT")]
    loras: Vec<String>,
}

#[derive(clap::Args)]
struct GenerateArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// [default: the UNet's sample_size × the VAE factor]
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
}

/// The output size of the editing modes, and how the input image is fitted to it.
#[derive(clap::Args)]
struct FitArgs {
    /// [default: the image's own, rounded to the nearest multiple the model takes]
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    /// How an image of another size is fitted, as Automatic1111's resize modes: just (stretch),
    /// crop (cover, then crop the centre) or fill (fit inside, fill the rest from its edges).
    #[arg(long, default_value = "just")]
    resize_mode: String,
}

impl FitArgs {
    fn size(&self) -> Size {
        Size { width: self.width, height: self.height }
    }
}

#[derive(clap::Args)]
struct Img2ImgArgs {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    fit: FitArgs,
    /// The image to start from (PNG).
    #[arg(long)]
    init_image: PathBuf,
    /// In (0, 1]: the share of the steps that run, so how much is repainted [default: 0.8].
    #[arg(long)]
    strength: Option<f64>,
}

#[derive(clap::Args)]
struct InpaintArgs {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    fit: FitArgs,
    /// The image to repaint (PNG).
    #[arg(long)]
    init_image: PathBuf,
    /// PNG of the image's size (fitted with it): white is repainted, black kept (grey is cut at half intensity).
    #[arg(long)]
    mask: PathBuf,
    /// Gaussian blur of the mask in pixels (0 to 64) before it is cut, which rounds its outline.
    #[arg(long, default_value_t = 0.0)]
    mask_blur: f32,
    /// In (0, 1]; below 1 the masked region starts from the noised image, not from noise [default: 1].
    #[arg(long)]
    strength: Option<f64>,
}

#[derive(clap::Args)]
struct UpscaleArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// The low-resolution image (PNG), sides multiples of the UNet's down-sampling (8 for the x4
    /// upscaler; 32, and at least 64, for the latent x2 upscaler).
    #[arg(long)]
    image: PathBuf,
    /// The image's latents, as --save-latents wrote them for it: the latent x2 upscaler takes
    /// them instead of encoding the image (they must be of the same VAE: SD 1.x/2.x's); the x4
    /// upscaler upscales the pixels.
    #[arg(long)]
    image_latents: Option<PathBuf>,
    /// x4 upscaler: noise added to the image before upscaling, 0 to the model's max_noise_level
    /// (350) [default: 20].
    #[arg(long)]
    noise_level: Option<usize>,
    /// x4 upscaler: upscale in overlapping tiles of this many input pixels (a multiple of the
    /// UNet's down-sampling) to bound memory; an image no larger than one tile runs in one piece.
    #[arg(long, default_value_t = upscale::DEFAULT_TILES.size)]
    tile: usize,
    /// x4 upscaler: minimum overlap of neighbouring tiles, in input pixels.
    #[arg(long, default_value_t = upscale::DEFAULT_TILES.overlap)]
    tile_overlap: usize,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate(args),
        Command::Img2img(args) => img2img(args),
        Command::Inpaint(args) => inpaint(args),
        Command::Upscale(args) => upscale(args),
        Command::Pack { model, out, format } => pack(&model, &out, &format),
        Command::Info { file, json } => info(&file, json),
        Command::Bench { model, size, batch, iters, backend, formats, steps, guidance, outputs } => {
            let report = if formats.is_empty() {
                backend.device().and_then(|device| bench::run(&device, &bench::BenchArgs { models: vec![model], size, batch, iters }))
            } else {
                // One model per format comparison: SD 1.5 unless another is named.
                let model = if model == "all" { "sd15".to_owned() } else { model };
                let backend_name = backend.to_possible_value().expect("a named backend").get_name().to_owned();
                formats.iter().map(|f| Format::from_name(f)).collect::<Result<Vec<_>>>().and_then(|formats| {
                    bench::formats(&bench::FormatArgs { model, size, steps, guidance, formats, backend: backend_name, outputs }, || backend.device())
                })
            };
            report.map(|report| println!("{}", serde_json::to_string_pretty(&report).expect("JSON")))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn info(file: &Path, json: bool) -> Result<()> {
    let bytes = std::fs::read(file).map_err(|e| Error::io(file, e))?;
    let text = infotext::read_png(&bytes)
        .map_err(|e| Error::Invalid(format!("{}: {e}", file.display())))?
        .ok_or_else(|| Error::Invalid(format!("{}: the PNG has no `parameters` text (Kiln and Automatic1111 write one)", file.display())))?;
    let info = Infotext::parse(&text);
    if json {
        let mut object = serde_json::Map::new();
        object.insert("prompt".into(), info.prompt.into());
        object.insert("negative_prompt".into(), info.negative_prompt.into());
        for (name, value) in info.fields {
            object.entry(name).or_insert(value.into());
        }
        println!("{}", serde_json::Value::Object(object));
    } else {
        println!("Prompt: {}", info.prompt);
        println!("Negative prompt: {}", info.negative_prompt);
        for (name, value) in info.fields {
            println!("{name}: {value}");
        }
    }
    Ok(())
}

fn pack(model: &Path, out: &Path, format: &str) -> Result<()> {
    let started = Instant::now();
    let manifest = kiln::package::pack(&kiln::files::Folder(model.to_owned()), Format::from_name(format)?, out)?;
    let quantized = manifest.tensors.iter().filter(|t| t.format == manifest.format).count();
    eprintln!(
        "wrote {}: {} tensors ({quantized} as {}, {} kept in f16), {} shards, {:.1} MB in {:.1}s",
        out.display(),
        manifest.tensors.len(),
        manifest.format.name(),
        manifest.tensors.len() - quantized,
        manifest.shards.len(),
        manifest.total_bytes() as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn generate(args: GenerateArgs) -> Result<()> {
    let (width, height) = (args.width, args.height);
    run(args.common, Mode::TextToImage, Size { width, height })
}

fn img2img(args: Img2ImgArgs) -> Result<()> {
    let strength = args.strength.unwrap_or(img2img::DEFAULT_STRENGTH);
    let (image, resize) = (read_image(&args.init_image)?, ResizeMode::from_name(&args.fit.resize_mode)?);
    run(args.common, Mode::ImageToImage(Img2Img { image, resize, strength, encode_noise: None }), args.fit.size())
}

fn inpaint(args: InpaintArgs) -> Result<()> {
    let input = Inpaint {
        image: read_image(&args.init_image)?,
        mask: read_image(&args.mask)?,
        resize: ResizeMode::from_name(&args.fit.resize_mode)?,
        mask_blur: args.mask_blur,
        strength: args.strength.unwrap_or(inpaint::DEFAULT_STRENGTH),
        image_noise: None,
        masked_image_noise: None,
    };
    run(args.common, Mode::Inpaint(input), args.fit.size())
}

fn upscale(args: UpscaleArgs) -> Result<()> {
    let tiles = Some(TileSize { size: args.tile, overlap: args.tile_overlap });
    let latents = args.image_latents.as_deref().map(npy::read).transpose()?.map(|latents| ImageLatents { latents, scaling_factor: None });
    let input = Upscale { image: read_image(&args.image)?, noise_level: args.noise_level, tiles, low_res_noise: None, latents };
    run(args.common, Mode::Upscale(input), Size::default())
}

/// The requested output size (upscaling takes four times its image's).
#[derive(Default)]
struct Size {
    width: Option<usize>,
    height: Option<usize>,
}

fn read_image(path: &Path) -> Result<Image8> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Image8::decode_png(&bytes).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))
}

/// Translates the common arguments, the mode and its size into [`Job`]s (one per `--count`),
/// runs them with progress on stderr and writes their PNGs. Without `--seed` a random one is
/// drawn, except for text-to-image from a latents file, where the seed only feeds ancestral
/// steps (then seeded with 0, and the PNG records no seed).
fn run(args: CommonArgs, mode: Mode, size: Size) -> Result<()> {
    if args.count == 0 || (args.count > 1 && args.latents.is_some()) {
        return Err(Error::Invalid("--count must be at least 1, and more than one image needs seeds, not --latents".into()));
    }
    let outs = numbered(&args.out, args.count).iter().map(|path| Ok((Output::claim(path)?, path.clone()))).collect::<Result<Vec<_>>>()?;
    let latents_outs: Vec<Option<PathBuf>> = match &args.save_latents {
        Some(path) => numbered(path, args.count).into_iter().map(Some).collect(),
        None => vec![None; outs.len()],
    };
    let kind = args.scheduler.as_deref().map(SchedulerKind::from_name).transpose()?;
    let latents = args.latents.as_deref().map(npy::read).transpose()?;

    let started = Instant::now();
    let device = args.backend.device()?;
    let format = args.weights.as_deref().map(Format::from_name).transpose()?;
    let model = match args.model.to_str().filter(|m| m.starts_with("http://") || m.starts_with("https://")) {
        Some(url) => download::model(url)?,
        None => args.model.clone(),
    };
    let loras = args.loras.iter().map(|arg| cli::lora::read(arg)).collect::<Result<Vec<_>>>()?;
    let prompt = cli::lora::tagged_prompt(&args.prompt, &loras)?;
    let pipe = StableDiffusion::open(&model, format, &Arc::new(Loras::read(&loras)?), &device)?;
    eprintln!("loaded {} in {:.1}s", args.model.display(), started.elapsed().as_secs_f64());

    let needs_seed = !matches!(mode, Mode::TextToImage) || latents.is_none();
    let seed = args.seed.or_else(|| needs_seed.then(random_seed));
    let request = Request {
        prompt,
        negative_prompt: args.negative_prompt,
        steps: args.steps,
        guidance: args.guidance,
        scheduler: kind,
        width: size.width,
        height: size.height,
        seed,
        latents,
        step_noise: None,
    };
    for (((out, path), latents_out), i) in outs.into_iter().zip(latents_outs).zip(0..) {
        let seed = seed.map(|s| s + i);
        if let Some(seed) = seed {
            eprintln!("seed {seed}");
        }
        let job = Job { request: Request { seed, ..request.clone() }, mode: mode.clone() };
        make(&pipe, job, out, latents_out.as_deref())?;
        eprintln!("wrote {} in {:.1}s", path.display(), started.elapsed().as_secs_f64());
    }
    Ok(())
}

/// `out` itself for one image, else `STEM-1.EXT` … `STEM-N.EXT` beside it.
fn numbered(out: &Path, count: u64) -> Vec<PathBuf> {
    if count == 1 {
        return vec![out.to_owned()];
    }
    let stem = out.file_stem().unwrap_or_default().to_string_lossy();
    let ext = out.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
    (1..=count).map(|i| out.with_file_name(format!("{stem}-{i}{ext}"))).collect()
}

/// Runs one job, printing each step, and commits its PNG to `out` (and its latents to `latents_out`).
fn make(pipe: &StableDiffusion, job: Job, out: Output, latents_out: Option<&Path>) -> Result<()> {
    let mut run = pipe.run(job)?;
    for warning in run.warnings() {
        eprintln!("warning: {warning}");
    }
    let loop_start = Instant::now();
    while !run.finished() {
        run.step(pipe)?;
        let probe = run.probe(None);
        probe.check(&read_back(probe.tensor.clone())?)?;
        eprintln!("step {}/{} ({:.1}s)", run.done(), run.total(), loop_start.elapsed().as_secs_f64());
    }
    out.commit(&run.png(&read_back(run.decode(pipe))?)?)?;
    if let Some(path) = latents_out {
        let latents = run.latents();
        let shape = latents.dims().to_vec();
        npy::write(path, &npy::Array { shape, values: read_back(latents.flatten::<1>(0, 3))? })?;
    }
    Ok(())
}

fn read_back(values: Tensor<1>) -> Result<Vec<f32>> {
    values.try_into_data().map_err(Error::gpu)?.try_to_vec::<f32>().map_err(|e| Error::Invalid(format!("reading the GPU's result back failed: {e:?}")))
}

/// A seed from the clock, as A1111's "-1" does; it is printed and stored in the PNG.
fn random_seed() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    (nanos as u64) % 4_294_967_296
}
