//! The latent x2 upscaler's UNet against diffusers on the published block structure (4
//! K-diffusion blocks, 2 layers, per-block head widths), too large to store even tiny: weights
//! and inputs come from the formula Kiln's random weights use, which scripts/make_fixtures.py
//! computes too (tests/fixtures/latent-upscale/unet). The pipeline's images are checked with the
//! other editing modes (editing.rs); here, what it does with latents it cannot use.
mod common;

use std::collections::BTreeMap;

use burn::tensor::{Tensor, TensorData};
use serde::Deserialize;

use kiln::model::unet::{AddedConditioning, TextConditioning, UNet2DConditionModel, UNetConfig};
use kiln::npy;
use kiln::pipeline::image_processor::Image8;
use kiln::pipeline::upscale::{ImageLatents, Upscale};
use kiln::pipeline::{Request, StableDiffusion};
use kiln::weights::{Weights, name_uniforms};

#[derive(Deserialize)]
struct Call {
    timestep: f64,
    inputs: BTreeMap<String, Vec<usize>>,
}

/// Unit-variance values for input `name`, as the fixture script draws them.
fn input<const D: usize>(call: &Call, name: &str, device: &burn::tensor::Device) -> Tensor<D> {
    let shape: [usize; D] = call.inputs[name].clone().try_into().expect("rank");
    let values: Vec<f32> = name_uniforms(name, shape.iter().product()).map(|u| (u * 3f64.sqrt()) as f32).collect();
    Tensor::from_data(TensorData::new(values, shape), device)
}

#[test]
fn k_diffusion_unet_equals_diffusers() {
    let dir = common::fixtures().join("latent-upscale/unet");
    let read = |file: &str| std::fs::read_to_string(dir.join(file)).expect(file);
    let config: UNetConfig = serde_json::from_str(&read("config.json")).expect("config");
    let call: Call = serde_json::from_str(&read("call.json")).expect("call");
    let device = common::wgpu();
    let unet = UNet2DConditionModel::load(&Weights::random(&device), config).expect("the published structure loads");
    let text = TextConditioning { hidden: input(&call, "context", &device), pooled: Some(input(&call, "cond", &device)) };
    let out = unet.forward(input(&call, "sample", &device), call.timestep, &text, AddedConditioning::None);
    let expected = npy::read(&dir.join("output.npy")).expect("output");
    assert_eq!(out.dims().to_vec(), expected.shape);
    let ours = out.into_data().try_to_vec::<f32>().expect("values");
    let max = ours.iter().zip(&expected.values).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    let scale = expected.values.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
    println!("max |ours - diffusers| {max:.2e} (outputs up to {scale:.2})");
    assert!(max <= 1e-4, "max |ours - diffusers| {max} (outputs up to {scale})");
}

/// Latents that cannot stand for the image (another VAE's, another size) are not used: the
/// image's pixels are encoded instead, and the user is told why.
#[test]
fn unusable_latents_fall_back_to_the_pixels() {
    let device = common::wgpu();
    let pipe = StableDiffusion::open(&common::fixtures().join("sd-x2-latent-upscaler-tiny"), None, &Default::default(), &device).expect("fixture loads");
    let image = Image8::decode_png(&std::fs::read(common::fixtures().join("editing/init.png")).expect("image")).expect("PNG");
    let ours = npy::read(&common::fixtures().join("latent-upscale/latent-x2-txt2img-guidance0.image_latents.npy")).expect("latents");
    let small = npy::Array { shape: vec![1, 4, 4, 4], values: vec![0.0; 64] };
    for (latents, scaling_factor, why) in [
        (ours, Some(0.13025), "the image's latents are of a VAE with scaling factor 0.13025, not this upscaler's 0.18215"),
        (small, None, "the image's latents have shape [1, 4, 4, 4], not the image's [1, 4, 8, 8]"),
    ] {
        let input = Upscale { image: image.clone(), noise_level: None, tiles: None, low_res_noise: None, latents: Some(ImageLatents { latents, scaling_factor }) };
        let run = pipe.start_upscale(Request { prompt: "x".into(), steps: Some(1), seed: Some(1), ..Default::default() }, input).expect("starts");
        assert_eq!(run.warnings, [format!("{why}: the image's pixels were encoded instead")]);
    }
}
