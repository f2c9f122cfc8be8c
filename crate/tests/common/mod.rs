//! Helpers shared by the integration tests.
#![allow(dead_code)]
use std::collections::HashMap;
use std::path::PathBuf;

use std::collections::VecDeque;

use burn::tensor::{Device, DeviceKind};
use kiln::npy;
use kiln::pipeline::png::to_rgb8;
use kiln::pipeline::{Denoising, Request, StableDiffusion};
use kiln::schedulers::SchedulerKind;
use serde::Deserialize;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// The product's backend: wgpu on the machine's Vulkan device (lavapipe in CI).
pub fn wgpu() -> Device {
    Device::wgpu(DeviceKind::DefaultDevice)
}

/// 8-bit RGB pixels and size of a PNG.
pub fn read_png(bytes: &[u8]) -> (Vec<u8>, usize, usize) {
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().expect("PNG header");
    let mut buf = vec![0; reader.output_buffer_size().expect("size")];
    let info = reader.next_frame(&mut buf).expect("PNG data");
    assert_eq!(info.color_type, png::ColorType::Rgb, "reference images are RGB");
    buf.truncate(info.buffer_size());
    (buf, info.width as usize, info.height as usize)
}

/// PSNR in dB of 8-bit `ours` against `reference` (infinite when equal).
pub fn psnr(ours: &[u8], reference: &[u8]) -> f64 {
    assert_eq!(ours.len(), reference.len(), "image sizes differ");
    let mse = ours.iter().zip(reference).map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2)).sum::<f64>() / ours.len() as f64;
    10.0 * (255.0f64.powi(2) / mse).log10()
}

/// (max, mean) absolute difference in 8-bit levels.
pub fn pixel_diff(a: &[u8], b: &[u8]) -> (u8, f64) {
    assert_eq!(a.len(), b.len(), "image sizes differ");
    let diffs = a.iter().zip(b).map(|(&x, &y)| x.abs_diff(y));
    let max = diffs.clone().max().unwrap_or(0);
    let mean = diffs.map(f64::from).sum::<f64>() / a.len() as f64;
    (max, mean)
}

/// Per-case comparisons with diffusers' images at the engine's tolerance (max ≤ 3/255, mean ≤
/// 0.5/255 per 8-bit channel); every case runs, and `finish` reports all that failed.
#[derive(Default)]
pub struct Parity {
    failures: Vec<String>,
    count: usize,
}

impl Parity {
    pub fn check(&mut self, name: &str, ours: &[u8], theirs: &[u8]) {
        let (max, mean) = pixel_diff(ours, theirs);
        println!("{name:<40} max {max:>3}/255  mean {mean:.4}/255");
        if max > 3 || mean > 0.5 {
            self.failures.push(format!("{name}: max {max}/255, mean {mean:.3}/255"));
        }
        self.count += 1;
    }

    pub fn finish(self) {
        assert!(self.count > 0, "no cases ran");
        assert!(self.failures.is_empty(), "{} of {} cases differ from diffusers:\n{}", self.failures.len(), self.count, self.failures.join("\n"));
    }
}

/// Fixture pipelines loaded once per test, by folder name under tests/fixtures.
pub struct Pipelines<'d> {
    device: &'d Device,
    loaded: HashMap<String, StableDiffusion>,
}

impl<'d> Pipelines<'d> {
    pub fn new(device: &'d Device) -> Self {
        Self { device, loaded: HashMap::new() }
    }

    pub fn get(&mut self, model: &str) -> &StableDiffusion {
        let device = self.device;
        self.loaded.entry(model.to_owned()).or_insert_with(|| StableDiffusion::open(&fixtures().join(model), None, &Default::default(), device).expect("fixture loads"))
    }
}

/// The text-to-image cases of tests/fixtures/images and tests/fixtures/sdxl (diffusers'
/// images and inputs).
#[derive(Deserialize)]
pub struct Case {
    /// The folder of its files.
    #[serde(skip)]
    pub dir: PathBuf,
    pub name: String,
    pub model: String,
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub steps: usize,
    pub guidance: f64,
    pub scheduler: String,
    pub width: usize,
    pub height: usize,
    pub latents: String,
    pub noise: Option<String>,
    pub image: String,
}

/// The text-to-image case files and the folders of their files.
pub const CASE_FILES: [(&str, &str); 2] = [("images", "cases.json"), ("sdxl", "images.json")];

pub fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for (folder, file) in CASE_FILES {
        let dir = fixtures().join(folder);
        let text = std::fs::read_to_string(dir.join(file)).unwrap_or_else(|e| panic!("{folder}/{file}: {e}"));
        let read: Vec<Case> = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{folder}/{file}: {e}"));
        cases.extend(read.into_iter().map(|case| Case { dir: dir.clone(), ..case }));
    }
    cases
}

/// The reference image of `case`.
pub fn reference(case: &Case) -> Vec<u8> {
    read_png(&std::fs::read(case.dir.join(&case.image)).expect("reference image")).0
}

pub fn run_case(pipe: &StableDiffusion, case: &Case) -> Vec<u8> {
    let dir = &case.dir;
    let step_noise = case.noise.as_ref().map(|file| {
        let noise = npy::read(&dir.join(file)).expect("noise");
        let per_draw: usize = noise.shape[1..].iter().product();
        noise.values.chunks(per_draw).map(<[f32]>::to_vec).collect::<VecDeque<_>>()
    });
    let request = Request {
        prompt: case.prompt.clone(),
        negative_prompt: case.negative_prompt.clone().unwrap_or_default(),
        steps: Some(case.steps),
        guidance: Some(case.guidance),
        scheduler: Some(SchedulerKind::from_name(&case.scheduler).expect("scheduler name")),
        width: Some(case.width),
        height: Some(case.height),
        seed: Some(0),
        latents: Some(npy::read(&dir.join(&case.latents)).expect("latents")),
        step_noise,
    };
    finish(pipe, pipe.start(request).expect("request is valid")).0
}

/// Steps `run` to its end and decodes it: the image's RGB bytes, its width and height.
pub fn finish(pipe: &StableDiffusion, mut run: Denoising) -> (Vec<u8>, usize, usize) {
    while !run.finished() {
        run.step(pipe).expect("step");
    }
    let values = run.decode(pipe).into_data().try_to_vec::<f32>().expect("image values");
    (to_rgb8(&values, run.width, run.height), run.width, run.height)
}
