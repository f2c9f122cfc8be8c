//! LoRA files merged as diffusers' `load_lora_weights` + `fuse_lora(lora_scale)` merges them
//! (tests/fixtures/lora, made by scripts/make_fixtures.py): kohya and PEFT files, several at
//! once, SD 1 and SD 2; the same images within the engine's tolerance, also when the merged
//! weights are quantized, and a LoRA of another model refused.
mod common;

use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use kiln::files::Folder;
use kiln::lora::{LoraFile, Loras};
use kiln::npy;
use kiln::package;
use kiln::pipeline::{Request, StableDiffusion};
use kiln::quant::Format;
use kiln::schedulers::SchedulerKind;

#[derive(Deserialize)]
struct Case {
    name: String,
    model: String,
    loras: Vec<Lora>,
    prompt: String,
    negative_prompt: Option<String>,
    scheduler: String,
    steps: usize,
    guidance: f64,
    latents: String,
    image: String,
}

#[derive(Deserialize)]
struct Lora {
    file: String,
    weight: f32,
}

fn dir() -> std::path::PathBuf {
    common::fixtures().join("lora")
}

fn cases() -> Vec<Case> {
    serde_json::from_str(&std::fs::read_to_string(dir().join("cases.json")).expect("lora/cases.json")).expect("parses")
}

fn loras(case: &Case) -> Arc<Loras> {
    let files: Vec<LoraFile> = case
        .loras
        .iter()
        .map(|l| LoraFile { name: l.file.trim_end_matches(".safetensors").into(), bytes: std::fs::read(dir().join(&l.file)).expect("LoRA file"), scale: l.weight })
        .collect();
    Arc::new(Loras::read(&files).expect("LoRA files read"))
}

fn render(pipe: &StableDiffusion, case: &Case) -> Vec<u8> {
    let request = Request {
        prompt: case.prompt.clone(),
        negative_prompt: case.negative_prompt.clone().unwrap_or_default(),
        steps: Some(case.steps),
        guidance: Some(case.guidance),
        scheduler: Some(SchedulerKind::from_name(&case.scheduler).expect("scheduler name")),
        latents: Some(npy::read(&dir().join(&case.latents)).expect("latents")),
        ..Default::default()
    };
    common::finish(pipe, pipe.start(request).expect("request is valid")).0
}

fn reference(case: &Case) -> Vec<u8> {
    common::read_png(&std::fs::read(dir().join(&case.image)).expect("reference")).0
}

fn model(case: &Case) -> std::path::PathBuf {
    common::fixtures().join(&case.model)
}

#[test]
fn images_with_loras_equal_diffusers() {
    let device = common::wgpu();
    let mut parity = common::Parity::default();
    let cases = cases();
    assert!(cases.len() >= 4);
    for case in &cases {
        let pipe = StableDiffusion::open(&model(case), None, &loras(case), &device).expect("fixture loads with its LoRAs");
        let theirs = reference(case);
        parity.check(&case.name, &render(&pipe, case), &theirs);
        // The LoRA matters: the model without it is far from diffusers' image with it.
        let plain = StableDiffusion::open(&model(case), None, &Default::default(), &device).expect("fixture loads");
        let (max, mean) = common::pixel_diff(&render(&plain, case), &theirs);
        assert!(max > 30 && mean > 4.0, "{}: without the LoRA max {max}, mean {mean:.2}", case.name);
    }
    parity.finish();
}

/// Merged before quantizing (a repo converted as it loads) or into weights that arrive
/// quantized (a package: decoded, merged, quantized again), the q8 image keeps the floor q8
/// packages keep without a LoRA (40 dB against diffusers' f32 image).
#[test]
fn quantized_models_keep_the_merged_layers() {
    let device = common::wgpu();
    let case = cases().into_iter().find(|c| c.name == "sd1-kohya-0.8").expect("case");
    let theirs = reference(&case);
    let packed = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("lora/sd1-q8");
    let _ = std::fs::remove_dir_all(&packed);
    package::pack(&Folder(model(&case)), Format::Q8, &packed).expect("pack");
    let mut failures = Vec::new();
    for (what, dir, format) in [("converted as it loads", model(&case), Some(Format::Q8)), ("q8 package", packed, None)] {
        let pipe = StableDiffusion::open(&dir, format, &loras(&case), &device).expect("loads with the LoRA");
        let db = common::psnr(&render(&pipe, &case), &theirs);
        println!("{what:<24} q8 + LoRA PSNR {db:.1} dB");
        if db < 40.0 {
            failures.push(format!("{what}: {db:.1} dB"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_lora_of_another_model_is_refused() {
    let device = common::wgpu();
    let case = cases().into_iter().find(|c| c.model == "sd2-tiny").expect("an SD 2 case");
    let err = StableDiffusion::open(Path::new(&common::fixtures().join("sd1-tiny")), None, &loras(&case), &device).err().expect("refused").to_string();
    assert!(err.starts_with("LoRA `sd2-kohya`") && err.contains("another"), "{err}");
}
