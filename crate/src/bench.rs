//! `kiln bench`: full-size published architectures with random weights, timed component
//! by component. Figures, not a test; the PyTorch peer is `scripts/bench_diffusers.py`.
use std::time::Instant;

use burn::tensor::{Device, Distribution, Tensor};
use serde_json::{Value, json};

use kiln::model::clip::ClipTextModel;
use kiln::model::unet::UNet2DConditionModel;
use kiln::model::vae::AutoencoderKL;
use kiln::weights::Weights;
use kiln::{Error, Result};

/// The published configs (unet, vae, text_encoder, scheduler) of the models benchmarked.
pub const PRESETS: [(&str, &str); 2] = [("sd15", include_str!("../presets/sd15.json")), ("sd-turbo", include_str!("../presets/sd-turbo.json"))];

pub struct BenchArgs {
    pub models: Vec<String>,
    pub size: usize,
    pub batch: usize,
    pub iters: usize,
}

fn config<T: serde::de::DeserializeOwned>(preset: &Value, key: &str) -> Result<T> {
    serde_json::from_value(preset[key].clone()).map_err(|e| Error::Invalid(format!("preset {key}: {e}")))
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

pub fn run(device: &Device, args: &BenchArgs) -> Result<Value> {
    if let Some(unknown) = args.models.iter().find(|m| *m != "all" && !PRESETS.iter().any(|(n, _)| n == m)) {
        return Err(Error::Invalid(format!("unknown model {unknown:?}; choose sd15, sd-turbo or all")));
    }
    let mut results = Vec::new();
    for (name, text) in PRESETS.iter().filter(|(n, _)| args.models.iter().any(|m| m == n || m == "all")) {
        let preset: Value = serde_json::from_str(text).expect("embedded presets are valid JSON");
        // Each model's figures start from empty pools.
        device.memory_cleanup();

        let w = Weights::random(device);
        let text_encoder = ClipTextModel::load(&w, config(&preset, "text_encoder")?)?;
        let text_params = w.random_count();
        let w = Weights::random(device);
        let unet = UNet2DConditionModel::load(&w, config(&preset, "unet")?)?;
        let unet_params = w.random_count();
        let w = Weights::random(device);
        let vae = AutoencoderKL::load(&w, config(&preset, "vae")?)?;
        let vae_params = w.random_count();
        device.sync().map_err(|e| Error::Invalid(format!("device: {e:?}")))?;
        let weights_bytes = reserved_bytes(device);

        let f = vae.config.scale_factor();
        let latent = args.size / f;
        let ids = vec![vec![49406u32; text_encoder.config.max_position_embeddings]; args.batch];
        let text_ms = time_ms(args.iters, || text_encoder.forward(&ids));
        let context = text_encoder.forward(&ids);
        let sample = Tensor::<4>::random([args.batch, unet.config.in_channels, latent, latent], Distribution::Normal(0.0, 1.0), device);
        let unet_ms = time_ms(args.iters, || unet.forward(sample.clone(), 500.0, &context));
        let z = Tensor::<4>::random([1, vae.config.latent_channels, latent, latent], Distribution::Normal(0.0, 1.0), device);
        let vae_ms = time_ms(args.iters, || vae.decode(z.clone()));

        results.push(json!({
            "model": name,
            "params_millions": {
                "text_encoder": text_params as f64 / 1e6,
                "unet": unet_params as f64 / 1e6,
                "vae": vae_params as f64 / 1e6,
            },
            "text_encoder_ms": text_ms,
            "unet_ms_per_call": unet_ms,
            "vae_decode_ms": vae_ms,
            "weights_bytes_on_device": weights_bytes,
            "reserved_bytes_after_runs": reserved_bytes(device),
        }));
    }
    Ok(json!({
        "engine": "kiln (burn 0.22, f32)",
        "device": format!("{device:?}"),
        "size": args.size,
        "batch": args.batch,
        "iters": args.iters,
        "results": results,
    }))
}
