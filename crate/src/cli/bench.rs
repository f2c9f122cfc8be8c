//! `kiln bench`: figures, not a test. Speed is timed component by component on the calls
//! `kiln::bench::Components` defines (the page's peer is `scripts/bench-web`, PyTorch's
//! `scripts/bench_diffusers.py`), for the full-size published architectures with random weights
//! or for a model folder; `--formats` instead compares stored weight formats: package bytes,
//! peak GPU memory of a guided generation, and the error against f32.
use std::path::Path;
use std::time::Instant;

use burn::tensor::{Device, Tensor, TensorData};
use serde_json::{Value, json};

use kiln::bench::{Components, config, preset, text_encoder_configs};
use kiln::model::clip::{ClipTextConfig, ClipTextModel, HiddenLayer, Pooling};
use kiln::model::unet::{AddedConditioning, TextConditioning, UNet2DConditionModel};
use kiln::model::vae::AutoencoderKL;
use kiln::pipeline::rng::NormalRng;
use kiln::pipeline::{StableDiffusion, TextStates, decode_latents, predict};
use kiln::quant::Format;
use kiln::schedulers::{self, SchedulerConfig, SchedulerKind};
use kiln::weights::Weights;
use kiln::{Error, Result};

pub struct BenchArgs {
    pub models: Vec<String>,
    pub size: usize,
    pub batch: usize,
    pub iters: usize,
}

pub struct FormatArgs {
    pub model: String,
    pub size: usize,
    pub steps: usize,
    /// 1 or less: one UNet pass a step (SDXL-Turbo runs at 0).
    pub guidance: f64,
    pub formats: Vec<Format>,
    /// `--backend` as given, for the runs in child processes.
    pub backend: String,
    /// Where the first format's figures, latents and pixels go, as JSON (a child's answer).
    pub outputs: Option<std::path::PathBuf>,
}

/// Mean wall time of `iters` runs after one warm-up. Reading one value of each output
/// back makes sure the work was done, not only queued.
fn time_ms<const D: usize>(iters: usize, mut f: impl FnMut() -> Tensor<D>) -> f64 {
    let mut run = || f().flatten::<1>(0, D - 1).narrow(0, 0, 1).into_data();
    run();
    let start = Instant::now();
    for _ in 0..iters {
        run();
    }
    start.elapsed().as_secs_f64() * 1000.0 / iters as f64
}

/// Bytes the device's memory pools hold. Pools keep freed pages for reuse, so after the
/// runs this bounds the peak from above.
fn reserved_bytes(device: &Device) -> Option<u64> {
    device.memory_pool_usage().map(|u| u.bytes_reserved)
}

fn sync(device: &Device) -> Result<()> {
    device.sync().map_err(|e| Error::Invalid(format!("device: {e:?}")))
}

/// `kiln bench --formats`. One format runs here; several run each in a fresh `kiln` process
/// (memory pools keep some pages after clean-up, which would count against the next format),
/// and each gets its error against the first: latent RMSE and 8-bit image PSNR.
pub fn formats(args: &FormatArgs, device: impl FnOnce() -> Result<Device>) -> Result<Value> {
    let runs = match args.formats[..] {
        [format] => vec![generate(&device()?, args, format)?],
        _ => args.formats.iter().map(|&format| in_child(args, format)).collect::<Result<Vec<_>>>()?,
    };
    let first = &runs[0];
    let results: Vec<Value> = runs
        .iter()
        .map(|run| {
            let rmse = (run.latents.iter().zip(&first.latents).map(|(a, b)| f64::from(a - b).powi(2)).sum::<f64>() / run.latents.len() as f64).sqrt();
            let mse = run.pixels.iter().zip(&first.pixels).map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2)).sum::<f64>() / run.pixels.len() as f64;
            let mut figures = run.figures.clone();
            figures["latent_rmse_vs_first"] = json!(rmse);
            figures["image_psnr_db_vs_first"] = if mse > 0.0 { json!(10.0 * (255.0f64.powi(2) / mse).log10()) } else { json!("inf") };
            figures
        })
        .collect();
    if let Some(path) = &args.outputs {
        let outputs = json!({ "figures": first.figures, "latents": first.latents, "pixels": first.pixels });
        std::fs::write(path, outputs.to_string()).map_err(|e| Error::Io { path: path.clone(), source: e })?;
    }
    Ok(json!({
        "engine": "kiln (burn 0.22)",
        "device": first.figures["device"],
        "model": args.model,
        "size": args.size,
        "steps": args.steps,
        "scheduler": format!("euler, guidance {}", args.guidance),
        "results": results,
    }))
}

/// What one format's generation measured, and its final latents and 8-bit pixels.
struct Run {
    figures: Value,
    latents: Vec<f32>,
    pixels: Vec<u8>,
}

/// Runs `format` alone in a fresh `kiln bench` process, which hands back its outputs in a file.
fn in_child(args: &FormatArgs, format: Format) -> Result<Run> {
    let exe = std::env::current_exe().map_err(|e| Error::Invalid(format!("cannot find the kiln executable: {e}")))?;
    let outputs = std::env::temp_dir().join(format!("kiln-bench-{}-{}.json", std::process::id(), format.name()));
    let (size, steps, guidance) = (args.size.to_string(), args.steps.to_string(), args.guidance.to_string());
    let status = std::process::Command::new(exe)
        .args(["bench", "--model", &args.model, "--size", &size, "--steps", &steps, "--guidance", &guidance, "--backend", &args.backend, "--formats", format.name()])
        .arg("--outputs")
        .arg(&outputs)
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|e| Error::Invalid(format!("cannot start kiln bench for {}: {e}", format.name())))?;
    if !status.success() {
        return Err(Error::Invalid(format!("kiln bench for {} failed ({status})", format.name())));
    }
    let text = std::fs::read_to_string(&outputs).map_err(|e| Error::Io { path: outputs.clone(), source: e })?;
    let _ = std::fs::remove_file(&outputs);
    let mut value: Value = serde_json::from_str(&text).map_err(|e| Error::Invalid(format!("{}: {e}", outputs.display())))?;
    let bad = |e: serde_json::Error| Error::Invalid(format!("{}: {e}", outputs.display()));
    let latents = serde_json::from_value(value["latents"].take()).map_err(bad)?;
    let pixels = serde_json::from_value(value["pixels"].take()).map_err(bad)?;
    Ok(Run { figures: value["figures"].take(), latents, pixels })
}

/// One Euler generation (`steps` steps at the args' guidance) of a `size`² image from fixed
/// token ids and seeded latents, with every component's weights converted to `format`; SDXL's
/// UNet also gets the last encoder's pooled text and the time ids. Peak memory is the largest
/// of the pools' reserved bytes sampled after loading, each text encoder, each step and the
/// decode (pools only grow between clean-ups, so each sample covers what ran since the one
/// before).
fn generate(device: &Device, args: &FormatArgs, format: Format) -> Result<Run> {
    let preset = preset(&args.model)?;
    let scheduler_config = SchedulerConfig::from_json(&preset["scheduler"].to_string())?;
    let mut peak = 0u64;
    let sample = |peak: &mut u64| -> Result<()> {
        sync(device)?;
        *peak = (*peak).max(reserved_bytes(device).unwrap_or(0));
        Ok(())
    };
    let started = Instant::now();
    // As the pipeline holds them: the UNet and the VAE's decoder stay on the device; the text
    // encoder is built for the prompt and dropped after (the VAE's encoder only for the check
    // at load, as text to image never runs it).
    let text_configs = text_encoder_configs(&preset)?;
    let w: Vec<Weights> = (0..text_configs.len() + 2).map(|_| Weights::random(device).converted(format)).collect();
    let (w_unet, w_vae, w_text) = (&w[0], &w[1], &w[2..]);
    let unet = UNet2DConditionModel::load(w_unet, config(&preset, "unet")?)?;
    let vae = AutoencoderKL::load(w_vae, config(&preset, "vae")?)?;
    device.memory_cleanup();
    sample(&mut peak)?;
    let weights_reserved = peak;
    let weights_in_use = device.memory_pool_usage().map(|u| u.bytes_in_use);
    let load_s = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let text = encode(&text_configs, w_text, unet.config.addition_embed_type.is_some(), args.guidance > 1.0, &mut || sample(&mut peak))?;
    device.memory_cleanup();
    let package_bytes: u64 = w.iter().map(|w| w.random_stats().1).sum();
    let f = vae.config.scale_factor();
    let shape = [1, vae.config.latent_channels, args.size / f, args.size / f];
    let mut scheduler = schedulers::build(SchedulerKind::Euler, &scheduler_config, args.steps)?;
    let added = if unet.config.addition_embed_type.is_some() { AddedConditioning::time_ids(args.size, args.size) } else { AddedConditioning::None };
    let noise = NormalRng::new(0).normals(shape.iter().product());
    let mut latents = Tensor::<4>::from_data(TensorData::new(noise, shape), device).mul_scalar(scheduler.init_noise_sigma());
    for index in 0..scheduler.timesteps().len() {
        let t = scheduler.timesteps()[index];
        let input = scheduler.scale_model_input(latents.clone(), index);
        let prediction = predict(&unet, input, t, &text, added, args.guidance);
        latents = scheduler.step(prediction, index, latents, &mut || unreachable!("Euler draws no noise"));
        sample(&mut peak)?;
    }
    let image = decode_latents(&vae, latents.clone(), None);
    sample(&mut peak)?;
    let generate_s = started.elapsed().as_secs_f64();
    let latents = latents.into_data().try_to_vec::<f32>().map_err(|e| Error::Invalid(format!("{e:?}")))?;
    let pixels: Vec<u8> = image.into_data().try_to_vec::<f32>().map_err(|e| Error::Invalid(format!("{e:?}")))?.iter().map(|v| (v * 255.0).round() as u8).collect();
    let figures = json!({
        "format": format.name(),
        "device": format!("{device:?}"),
        "package_bytes": package_bytes,
        "weights_bytes_in_use": weights_in_use,
        "weights_bytes_reserved": weights_reserved,
        "peak_reserved_bytes": peak,
        "load_s": load_s,
        "generate_s": generate_s,
    });
    // Each format's figures as soon as they exist: a large size runs for a long time.
    eprintln!("{figures}");
    Ok(Run { figures, latents, pixels })
}

/// The text states of a fixed prompt (and with `guided` the empty negative one), each encoder
/// built, run and dropped in turn as the pipeline does, `sample` taken after each; with
/// `pooled`, the last encoder's projected end-token state too (SDXL).
fn encode(configs: &[ClipTextConfig], weights: &[Weights], pooled: bool, guided: bool, sample: &mut dyn FnMut() -> Result<()>) -> Result<TextStates> {
    let prompts: &[&[u32]] = if guided { &[&[49406, 49407], &[49406, 320, 1125, 539, 320, 2368, 49407]] } else { &[&[49406, 320, 1125, 539, 320, 2368, 49407]] };
    let mut hidden = Vec::new();
    let mut pooled_out = None;
    for (i, (config, w)) in configs.iter().zip(weights).enumerate() {
        let ids: Vec<Vec<u32>> = prompts.iter().map(|t| t.iter().copied().chain(std::iter::repeat(49407)).take(config.max_position_embeddings).collect()).collect();
        let pooling = if pooled && i + 1 == configs.len() { Pooling::Projected } else { Pooling::None };
        let layer = if configs.len() > 1 { HiddenLayer::Penultimate } else { HiddenLayer::Last };
        let out = ClipTextModel::load(w, config.clone())?.forward(&ids, layer, pooling);
        hidden.push(out.hidden);
        pooled_out = pooled_out.or(out.pooled);
        sample()?;
    }
    let hidden = if hidden.len() == 1 { hidden.remove(0) } else { Tensor::cat(hidden, 2) };
    let text = TextConditioning { hidden, pooled: pooled_out };
    Ok(if guided { TextStates::Paired(text) } else { TextStates::Single(text) })
}

/// Times each model of `args` (a preset name, `all`, or a pipeline folder).
pub fn run(device: &Device, args: &BenchArgs) -> Result<Value> {
    let mut results = Vec::new();
    for model in &args.models {
        let names: Vec<&str> = if model == "all" { kiln::bench::PRESETS.iter().map(|(n, _)| *n).collect() } else { vec![model.as_str()] };
        for name in names {
            // Each model's figures start from empty pools.
            device.memory_cleanup();
            let folder = Path::new(name);
            let (components, params) = if folder.is_dir() {
                (Components::from_pipeline(StableDiffusion::open(folder, None, &Default::default(), device)?, args.size, args.batch)?, None)
            } else {
                let (components, params) = Components::random(name, args.size, args.batch, device)?;
                (components, Some(params))
            };
            sync(device)?;
            let weights_bytes = reserved_bytes(device);
            results.push(json!({
                "model": components.name,
                "params_millions": params.map(|p| json!({
                    "text_encoder": p.text_encoder as f64 / 1e6,
                    "unet": p.unet as f64 / 1e6,
                    "vae": p.vae as f64 / 1e6,
                })),
                "text_encoder_ms": time_ms(args.iters, || components.text_encoder_call()),
                "unet_ms_per_call": time_ms(args.iters, || components.unet_call()),
                "vae_decode_ms": time_ms(args.iters, || components.vae_decode()),
                "weights_bytes_on_device": weights_bytes,
                "reserved_bytes_after_runs": reserved_bytes(device),
            }));
        }
    }
    Ok(json!({
        "engine": "kiln (burn 0.22)",
        "device": format!("{device:?}"),
        "size": args.size,
        "batch": args.batch,
        "iters": args.iters,
        "results": results,
    }))
}
