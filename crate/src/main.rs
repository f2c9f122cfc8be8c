//! `kiln`: the command-line face of the engine (generation and benchmarks).
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use burn::tensor::Device;
use clap::{Parser, Subcommand, ValueEnum};

use kiln::pipeline::png::{self, GenerationParams};
use kiln::pipeline::{Request, StableDiffusion};
use kiln::schedulers::SchedulerKind;
use kiln::{Error, Result, npy};

mod bench;

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

impl Backend {
    fn device(self) -> Device {
        match self {
            Backend::Wgpu => Device::wgpu_options().init().unwrap_or_else(|e| {
                eprintln!("warning: no wgpu device ({e}); using the CPU backend");
                Device::flex()
            }),
            Backend::Cpu => Device::flex(),
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Text to image.
    Generate(GenerateArgs),
    /// Time full-size SD 1.5 / SD-Turbo with random weights (no download); prints JSON.
    Bench {
        /// sd15, sd-turbo or all.
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
    },
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// A diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/).
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// Denoising steps [default: 50].
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance scale; 1 or less skips the unconditional pass [default: 7.5].
    #[arg(long)]
    guidance: Option<f64>,
    /// ddim, pndm, euler, euler-a, dpmpp-2m, dpmpp-2m-karras or lcm [default: the model's own].
    #[arg(long)]
    scheduler: Option<String>,
    /// [default: the UNet's sample_size × the VAE factor]
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    /// Seed of the initial noise and of the noise ancestral schedulers draw while stepping [default: random].
    #[arg(long)]
    seed: Option<u64>,
    /// Initial noise as float32 .npy `[1, C, H/f, W/f]`, unscaled standard normal (as diffusers' `latents=`).
    #[arg(long)]
    latents: Option<PathBuf>,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value = "wgpu")]
    backend: Backend,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate(args),
        Command::Bench { model, size, batch, iters, backend } => {
            let args = bench::BenchArgs { models: vec![model], size, batch, iters };
            bench::run(&backend.device(), &args).map(|report| println!("{}", serde_json::to_string_pretty(&report).expect("JSON")))
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

fn generate(args: GenerateArgs) -> Result<()> {
    let kind = args.scheduler.as_deref().map(SchedulerKind::from_name).transpose()?;
    let latents = args.latents.as_deref().map(npy::read).transpose()?;
    // With a latents file the seed only feeds the schedulers that draw noise while stepping.
    let seed = args.seed.or_else(|| latents.is_none().then(random_seed));

    let started = Instant::now();
    let device = args.backend.device();
    let pipe = StableDiffusion::load_dir(&args.model, &device)?;
    eprintln!("loaded {} in {:.1}s", args.model.display(), started.elapsed().as_secs_f64());
    if let Some(seed) = seed {
        eprintln!("seed {seed}");
    }

    let request = Request {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        steps: args.steps,
        guidance: args.guidance,
        scheduler: kind,
        width: args.width,
        height: args.height,
        seed: seed.unwrap_or(0),
        latents,
        step_noise: None,
    };
    let guidance = request.guidance.unwrap_or(kiln::pipeline::DEFAULT_GUIDANCE);
    let mut run = pipe.start(request)?;
    for warning in &run.warnings {
        eprintln!("warning: {warning}");
    }
    let loop_start = Instant::now();
    while !run.finished() {
        run.step(&pipe)?;
        eprintln!("step {}/{} ({:.1}s)", run.done(), run.total(), loop_start.elapsed().as_secs_f64());
    }
    let image = run.decode(&pipe);
    let values = image.into_data().try_to_vec::<f32>().map_err(|e| Error::Invalid(format!("reading the image back failed: {e:?}")))?;
    let rgb = png::to_rgb8(&values, run.width, run.height);
    let params = GenerationParams {
        prompt: args.prompt,
        negative_prompt: args.negative_prompt,
        steps: run.steps,
        sampler: run.kind.a1111_name().to_string(),
        cfg_scale: guidance,
        seed,
        width: run.width,
        height: run.height,
        model: pipe.name.clone(),
    };
    let bytes = png::encode(&rgb, run.width, run.height, &params.a1111_text())?;
    std::fs::write(&args.out, bytes).map_err(|e| Error::io(&args.out, e))?;
    eprintln!("wrote {} ({}x{}) in {:.1}s", args.out.display(), run.width, run.height, started.elapsed().as_secs_f64());
    Ok(())
}

/// A seed from the clock, as A1111's "-1" does; it is printed and stored in the PNG.
fn random_seed() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    (nanos as u64) % 4_294_967_296
}
