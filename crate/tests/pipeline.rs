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
        let reference = std::fs::read(common::fixtures().join("images").join(&case.image)).expect("reference image");
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
        let pipe = StableDiffusion::load_dir(&model, device).expect("fixture loads");
        let run = pipe.start(Request { prompt: "a seed".into(), seed, steps: Some(1), ..Default::default() }).expect("start");
        run.latents().into_data().try_to_vec::<f32>().expect("values")
    };
    let first = latents_on(&common::wgpu(), 1234);
    assert_eq!(first, latents_on(&common::wgpu(), 1234));
    assert_eq!(first, latents_on(&Device::flex(), 1234));
    assert_ne!(first, latents_on(&Device::flex(), 1235));
}
