//! The sharp live preview: the tiny autoencoder (TAESD) against diffusers' `AutoencoderTiny`
//! on the committed fixture (tests/fixtures/taesd-tiny, made by scripts/make_fixtures.py), and
//! a run's preview drawn by it.
mod common;

use burn::tensor::{Device, Tensor, TensorData};

use kiln::files::Folder;
use kiln::model::autoencoder_tiny::AutoencoderTiny;
use kiln::pipeline::preview::{self, Previewer, Rendered};
use kiln::pipeline::{Job, Mode, Request, StableDiffusion};

fn taesd(device: &Device) -> AutoencoderTiny {
    AutoencoderTiny::load(&Folder(common::fixtures().join("taesd-tiny")), device).expect("the fixture loads")
}

/// Max and mean absolute difference of two equally long slices.
fn diff(ours: &[f32], theirs: &[f32]) -> (f32, f32) {
    assert_eq!(ours.len(), theirs.len());
    let d: Vec<f32> = ours.iter().zip(theirs).map(|(a, b)| (a - b).abs()).collect();
    (d.iter().copied().fold(0.0, f32::max), d.iter().sum::<f32>() / d.len() as f32)
}

/// diffusers' decode of the reference latents, on both backends, within 1e-4 of [-1, 1]
/// (0.013/255): the decoder is a dozen f32 convolutions.
#[test]
fn tiny_autoencoder_decodes_as_diffusers_does() {
    let reference = common::fixtures().join("taesd-tiny/reference");
    let latents = kiln::npy::read(&reference.join("latents.npy")).expect("latents");
    let expected = kiln::npy::read(&reference.join("decoded.npy")).expect("decoded");
    for (name, device) in [("wgpu", common::wgpu()), ("cpu", Device::flex())] {
        let shape: [usize; 4] = latents.shape.clone().try_into().expect("4-d latents");
        let input = Tensor::<4>::from_data(TensorData::new(latents.values.clone(), shape), &device);
        let image = taesd(&device).decode(input);
        assert_eq!(image.dims().to_vec(), expected.shape, "{name}: shape");
        let (max, mean) = diff(&image.into_data().try_to_vec::<f32>().expect("values"), &expected.values);
        eprintln!("TAESD decode vs diffusers on {name}: max {max:.2e}, mean {mean:.2e}");
        assert!(max < 1e-4, "{name}: max difference {max}");
    }
}

/// A run's sharp preview is the tiny autoencoder's image of the same denoised latents the
/// approximate preview reads back, at the image's size.
#[test]
fn a_run_previews_its_denoised_latents_through_the_tiny_autoencoder() {
    let device = common::wgpu();
    let pipe = StableDiffusion::open(&common::fixtures().join("sd1-tiny"), None, &Default::default(), &device).expect("fixture loads");
    let decoder = taesd(&device);
    assert_eq!(preview::misfit(&decoder, &pipe), None);
    let request = Request { prompt: "a red cube".into(), seed: Some(3), steps: Some(3), width: Some(64), height: Some(96), ..Default::default() };
    let mut run = pipe.run(Job { request, mode: Mode::TextToImage }).expect("run");
    run.step(&pipe).expect("step");

    let read = |previewer| {
        let probe = run.probe(Some(previewer));
        let values = probe.tensor.clone().into_data().try_to_vec::<f32>().expect("values");
        (probe.preview(&values).expect("a preview"), values)
    };
    let (approx, values) = read(Previewer::Approx);
    assert_eq!((approx.width, approx.height), (8, 12));
    let (sharp, _) = read(Previewer::Tiny(&decoder));
    assert_eq!((sharp.width, sharp.height), (64, 96));

    let denoised = Tensor::<4>::from_data(TensorData::new(values[2..].to_vec(), [1, 4, 12, 8]), &device);
    let image = decoder.decode(denoised).into_data().try_to_vec::<f32>().expect("image");
    let expected = Rendered::Image([1, 3, 96, 64]).rgba(&image).expect("rgba");
    let (max, _) = common::pixel_diff(&sharp.rgba, &expected.rgba);
    assert!(max <= 1, "the preview differs from its latents' decode by {max}/255");
    let spread = sharp.rgba.iter().step_by(4).max().unwrap() - sharp.rgba.iter().step_by(4).min().unwrap();
    assert!(spread > 10, "a picture, not a flat colour (red spread {spread})");
}

/// A decoder for latents of another shape is refused with both shapes named.
#[test]
fn a_tiny_autoencoder_for_other_latents_does_not_fit() {
    let device = Device::flex();
    let pipe = StableDiffusion::open(&common::fixtures().join("sd-x4-upscaler-tiny"), None, &Default::default(), &device).expect("fixture loads");
    let why = preview::misfit(&taesd(&device), &pipe).expect("the x4 upscaler's VAE makes 4 px per latent");
    assert!(why.contains("of 8 px each") && why.contains("of 4 px"), "{why}");
}
