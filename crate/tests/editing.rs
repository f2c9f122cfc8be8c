//! Image-to-image, inpainting and upscaling (x4 and latent x2) against the diffusers pipelines'
//! own images for the tiny fixtures (tests/fixtures/editing, sdxl and latent-upscale, made by
//! scripts/make_fixtures.py with every noise draw injected). Tolerance per the engine's contract: max ≤ 3/255 and mean ≤ 0.5/255 per 8-bit channel.
mod common;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;

use burn::tensor::Device;
use serde::Deserialize;

use kiln::npy;
use kiln::pipeline::image_processor::Image8;
use kiln::pipeline::img2img::Img2Img;
use kiln::pipeline::inpaint::Inpaint;
use kiln::pipeline::tiles::TileSize;
use kiln::pipeline::upscale::{ImageLatents, Upscale};
use kiln::pipeline::{Denoising, Request, StableDiffusion};
use kiln::schedulers::SchedulerKind;

#[derive(Deserialize)]
struct Case {
    /// The folder of its noise and reference image (the inputs are in [`dir`]).
    #[serde(skip)]
    dir: PathBuf,
    name: String,
    mode: String,
    model: String,
    /// `None`: the folder's own (the latent upscaler takes no other).
    scheduler: Option<String>,
    strength: Option<f64>,
    steps: usize,
    guidance: f64,
    prompt: String,
    negative_prompt: Option<String>,
    image_input: String,
    mask: Option<String>,
    mask_blur: Option<f32>,
    noise_level: Option<usize>,
    /// Latent upscaling of a text-to-image result: its latents, which stand for `image_input`
    /// (of the same size).
    image_latents: Option<String>,
    image: String,
    noise: HashMap<String, String>,
}

/// The input images, and the SD cases.
fn dir() -> PathBuf {
    common::fixtures().join("editing")
}

/// The SD cases, then SDXL's and the latent upscaler's (tests/fixtures/sdxl and latent-upscale,
/// on the same inputs).
fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for (folder, file) in [("editing", "cases.json"), ("sdxl", "editing.json"), ("latent-upscale", "editing.json")] {
        let dir = common::fixtures().join(folder);
        let text = std::fs::read_to_string(dir.join(file)).unwrap_or_else(|e| panic!("{folder}/{file}: {e}"));
        let read: Vec<Case> = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{folder}/{file}: {e}"));
        cases.extend(read.into_iter().map(|case| Case { dir: dir.clone(), ..case }));
    }
    cases
}

fn image(file: &str) -> Image8 {
    Image8::decode_png(&std::fs::read(dir().join(file)).expect("input image")).expect("input PNG")
}

fn noise(case: &Case, role: &str) -> Option<npy::Array> {
    case.noise.get(role).map(|file| npy::read(&case.dir.join(file)).expect("noise"))
}

fn request(case: &Case) -> Request {
    let step_noise = noise(case, "step").map(|steps| {
        let per_draw: usize = steps.shape[1..].iter().product();
        steps.values.chunks(per_draw).map(<[f32]>::to_vec).collect::<VecDeque<_>>()
    });
    Request {
        prompt: case.prompt.clone(),
        negative_prompt: case.negative_prompt.clone().unwrap_or_default(),
        steps: Some(case.steps),
        guidance: Some(case.guidance),
        scheduler: case.scheduler.as_deref().map(|name| SchedulerKind::from_name(name).expect("scheduler name")),
        latents: noise(case, "latents"),
        step_noise,
        ..Default::default()
    }
}

fn start(pipe: &StableDiffusion, case: &Case, tiles: Option<TileSize>) -> Denoising {
    let req = request(case);
    let strength = case.strength.unwrap_or(1.0);
    match case.mode.as_str() {
        "img2img" => pipe
            .start_img2img(req, Img2Img { image: image(&case.image_input), resize: Default::default(), strength, encode_noise: noise(case, "encode") })
            .expect("img2img starts"),
        "inpaint" => pipe
            .start_inpaint(
                req,
                Inpaint {
                    image: image(&case.image_input),
                    mask: image(case.mask.as_deref().expect("mask")),
                    resize: Default::default(),
                    mask_blur: case.mask_blur.unwrap_or(0.0),
                    strength,
                    image_noise: noise(case, "image_encode"),
                    masked_image_noise: noise(case, "masked_encode"),
                },
            )
            .expect("inpainting starts"),
        "upscale" => pipe
            .start_upscale(
                req,
                Upscale {
                    image: image(&case.image_input),
                    noise_level: case.noise_level,
                    tiles,
                    low_res_noise: noise(case, "low_res"),
                    latents: case.image_latents.as_ref().map(|file| ImageLatents {
                        latents: npy::read(&case.dir.join(file)).expect("image latents"),
                        scaling_factor: None,
                    }),
                },
            )
            .expect("upscaling starts"),
        mode => panic!("unknown mode {mode}"),
    }
}

fn run(pipe: &StableDiffusion, case: &Case, tiles: Option<TileSize>) -> (Vec<u8>, usize, usize) {
    common::finish(pipe, start(pipe, case, tiles))
}

/// Every case `filter` picks, on one device; all failures are reported together.
fn check(device: &Device, filter: impl Fn(&Case) -> bool) {
    let mut pipes = common::Pipelines::new(device);
    let mut parity = common::Parity::default();
    for case in cases().iter().filter(|c| filter(c)) {
        let pipe = pipes.get(&case.model);
        let (ours, w, h) = run(pipe, case, None);
        let (theirs, tw, th) = common::read_png(&std::fs::read(case.dir.join(&case.image)).expect("reference image"));
        assert_eq!((w, h), (tw, th), "{}: size", case.name);
        parity.check(&case.name, &ours, &theirs);
    }
    parity.finish();
}

#[test]
fn img2img_equals_diffusers() {
    check(&common::wgpu(), |c| c.mode == "img2img");
}

#[test]
fn inpainting_equals_diffusers() {
    check(&common::wgpu(), |c| c.mode == "inpaint");
}

#[test]
fn upscaling_equals_diffusers() {
    check(&common::wgpu(), |c| c.mode == "upscale");
}

/// The portable CPU backend runs the same code; a few cases keep it quick.
#[test]
fn editing_equals_diffusers_on_cpu_backend() {
    let picked = ["img2img-euler-a-0.5", "inpaint-9ch-euler-a-0.6", "inpaint-blend-dpmpp-2m-0.75", "upscale-ddim", "latent-x2-guided"];
    check(&Device::flex(), |c| picked.contains(&c.name.as_str()));
}

/// Tiling. A tile as large as the image is the untiled pipeline bit for bit. Smaller tiles give
/// a different image, since each window's UNet and VAE see only that window: on this
/// random-weight fixture (no learned locality, so a worst case) 2×2 windows of 24 with overlap 16
/// over the 32×32 input differ from the untiled result by a mean of 19.9/255, about a third of
/// what a different seed changes (61.7/255). The test holds that bound with a little margin.
#[test]
fn tiled_upscaling_stays_close_to_untiled() {
    let device = common::wgpu();
    let case = cases().into_iter().find(|c| c.name == "upscale-ddim").expect("upscale-ddim case");
    let pipe = StableDiffusion::open(&common::fixtures().join(&case.model), None, &Default::default(), &device).expect("fixture loads");
    let (whole, _, _) = run(&pipe, &case, None);
    let (one_tile, _, _) = run(&pipe, &case, Some(TileSize { size: 32, overlap: 8 }));
    assert_eq!(one_tile, whole, "one tile covering the image must be the untiled pipeline");
    let (tiled, w, h) = run(&pipe, &case, Some(TileSize { size: 24, overlap: 16 }));
    assert_eq!((w, h), (128, 128));
    let (max, mean) = common::pixel_diff(&tiled, &whole);
    println!("2x2 tiles of 24 + 16 vs untiled: max {max}/255, mean {mean:.2}/255");
    assert!(mean <= 22.0, "tiled differs from untiled by a mean of {mean:.2}/255 (bound 22/255)");
}
