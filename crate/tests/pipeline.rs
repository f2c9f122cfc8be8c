//! Full text-to-image runs against diffusers' own images for the committed tiny pipelines
//! (tests/fixtures/images, made by scripts/make_fixtures.py). Tolerance per the engine's
//! contract: max ≤ 3/255 and mean ≤ 0.5/255 per 8-bit channel.
mod common;

use burn::tensor::Device;

use common::{Case, cases, run_case};
use kiln::pipeline::{Request, StableDiffusion};

/// Every case on one device; all failures are reported together.
fn check_all(device: &Device, filter: impl Fn(&Case) -> bool) {
    let mut pipes = common::Pipelines::new(device);
    let mut parity = common::Parity::default();
    for case in cases().iter().filter(|c| filter(c)) {
        let pipe = pipes.get(&case.model);
        let ours = run_case(pipe, case);
        let reference = std::fs::read(case.dir.join(&case.image)).expect("reference image");
        let (theirs, w, h) = common::read_png(&reference);
        assert_eq!((w, h), (case.width, case.height), "{}: reference size", case.name);
        parity.check(&case.name, &ours, &theirs);
    }
    parity.finish();
}

#[test]
fn images_equal_diffusers_on_wgpu() {
    check_all(&common::wgpu(), |_| true);
}

/// The portable CPU backend runs the same code; one case per model keeps it quick.
#[test]
fn images_equal_diffusers_on_cpu_backend() {
    check_all(&Device::flex(), |c| c.scheduler == "euler" && c.negative_prompt.is_none() && c.width == c.height);
}

/// One seed gives the same initial latents twice and on both backends.
#[test]
fn seeded_latents_are_identical_across_runs_and_backends() {
    let model = common::fixtures().join("sd1-tiny");
    let latents_on = |device: &Device, seed: u64| -> Vec<f32> {
        let pipe = StableDiffusion::open(&model, None, &Default::default(), device).expect("fixture loads");
        let run = pipe.start(Request { prompt: "a seed".into(), seed: Some(seed), steps: Some(1), ..Default::default() }).expect("start");
        run.latents().into_data().try_to_vec::<f32>().expect("values")
    };
    let first = latents_on(&common::wgpu(), 1234);
    assert_eq!(first, latents_on(&common::wgpu(), 1234));
    assert_eq!(first, latents_on(&Device::flex(), 1234));
    assert_ne!(first, latents_on(&Device::flex(), 1235));
}

/// Configs that would make a model fail part-way (or panic) are refused at load, naming the
/// setting.
#[test]
fn inconsistent_configs_are_refused_at_load() {
    let dir = common::fixtures().join("sd1-tiny");
    // The fixture's files as the engine reads them (those it has).
    let paths = kiln::layout::text_files().chain(kiln::layout::weight_stems().into_iter().map(|s| format!("{s}.safetensors")));
    let files: std::collections::HashMap<String, Vec<u8>> = paths.filter_map(|path| Some((path.clone(), std::fs::read(dir.join(&path)).ok()?))).collect();
    let cases = [
        ("vae/config.json", "norm_num_groups", 5, "do not split into norm_num_groups=5"),
        ("unet/config.json", "norm_num_groups", 0, "heads and 0 groups"),
        ("tokenizer/tokenizer_config.json", "model_max_length", 1, "no room for the start and end tokens"),
        ("text_encoder/config.json", "vocab_size", 1000, "tokenizer has token ids up to 49407 but text_encoder's vocab_size is 1000"),
    ];
    let device = Device::flex();
    for (path, key, value, expected) in cases {
        let mut config: serde_json::Value = serde_json::from_slice(&files[path]).unwrap();
        config[key] = value.into();
        let mut changed = files.clone();
        changed.insert(path.to_owned(), config.to_string().into_bytes());
        let model = kiln::files::MemoryFiles { name: "sd1-tiny".into(), files: changed };
        let err = StableDiffusion::load(&model, None, &Default::default(), &device).err().expect("an inconsistent config must not load").to_string();
        assert!(err.contains(expected), "{path} {key}={value}: {err}");
    }
}
