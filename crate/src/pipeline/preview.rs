//! The image as it forms, cheaply: the denoised estimate behind the last step, its latents
//! mapped to RGB by Automatic1111's fixed linear factors ("Approx cheap") at latent
//! resolution, which the caller scales up, or decoded by the tiny autoencoder (A1111's
//! "TAESD") at the image's size. The VAE never runs for it.
use burn::tensor::Tensor;
use serde::Serialize;

use super::StableDiffusion;
use crate::model::autoencoder_tiny::AutoencoderTiny;
use crate::schedulers::{Prediction, Scheduler};

/// RGB in [-1, 1] of one latent pixel of the SD 1.x/2.x VAE: the sum of each channel times
/// its row (A1111's `cheap_approximation`).
const SD_LATENT_RGB: [[f32; 3]; 4] = [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]];

/// A preview's pixels.
#[derive(Serialize)]
#[cfg_attr(test, derive(ts_rs::TS), ts(export))]
pub struct Preview {
    pub width: usize,
    pub height: usize,
    #[serde(with = "serde_bytes")]
    #[cfg_attr(test, ts(type = "Uint8Array"))]
    pub rgba: Vec<u8>,
}

/// The clean latents that `prediction`, the UNet's output at call `index`, implies for
/// `sample`. Every scheduler's latents there are `a·x0 + b·noise` ([`Scheduler::noise_scales`]),
/// so the estimate follows from `a` and `b` alone, whatever the scheduler.
pub fn denoised(scheduler: &dyn Scheduler, index: usize, sample: Tensor<4>, prediction: Tensor<4>) -> Tensor<4> {
    let (a, b) = scheduler.noise_scales(index);
    match scheduler.prediction() {
        Prediction::Epsilon => (sample - prediction.mul_scalar(b)).div_scalar(a),
        Prediction::Sample => prediction,
        // With c = √(a² + b²): the DDPM-scale sample is sample / c, √ᾱ = a / c, √(1 − ᾱ) = b / c.
        Prediction::VPrediction => {
            let c2 = a * a + b * b;
            (sample.mul_scalar(a) - prediction.mul_scalar(b * c2.sqrt())).div_scalar(c2)
        }
    }
}

/// How a preview is drawn.
#[derive(Clone, Copy)]
pub enum Previewer<'a> {
    /// A1111's linear factors, one pixel per latent pixel.
    Approx,
    /// The tiny autoencoder, one pixel per image pixel.
    Tiny(&'a AutoencoderTiny),
}

/// What a preview's values, read back, are.
#[derive(Clone, Copy)]
pub enum Rendered {
    /// Denoised latents `[1, C, h, w]`.
    Latents([usize; 4]),
    /// An image `[1, 3, H, W]` in [-1, 1].
    Image([usize; 4]),
}

impl Previewer<'_> {
    /// The preview of the `denoised` latents, flattened, still on the device.
    pub fn render(self, denoised: Tensor<4>) -> (Tensor<1>, Rendered) {
        let (tensor, rendered) = match self {
            Previewer::Approx => (denoised.clone(), Rendered::Latents(denoised.dims())),
            Previewer::Tiny(decoder) => {
                let image = decoder.decode(denoised);
                let shape = image.dims();
                (image, Rendered::Image(shape))
            }
        };
        (tensor.flatten::<1>(0, 3), rendered)
    }
}

/// Why `decoder` cannot preview `pipe`'s latents, if it cannot: it must take as many channels
/// and make as many pixels of each.
pub fn misfit(decoder: &AutoencoderTiny, pipe: &StableDiffusion) -> Option<String> {
    let (ours, theirs) = (&decoder.config, &pipe.vae.config);
    let fits = ours.latent_channels == theirs.latent_channels && ours.scale_factor() == theirs.scale_factor();
    (!fits).then(|| {
        format!(
            "the sharp preview's decoder takes {}-channel latents of {} px each, and {}'s are {}-channel of {} px: the approximate preview is shown instead",
            ours.latent_channels,
            ours.scale_factor(),
            pipe.name,
            theirs.latent_channels,
            theirs.scale_factor()
        )
    })
}

impl Rendered {
    /// The RGBA pixels of the `values` read back; `None` for latents without RGB factors.
    pub fn rgba(self, values: &[f32]) -> Option<Preview> {
        match self {
            Rendered::Latents(shape) => latent_rgba(values, shape),
            Rendered::Image([_, 3, height, width]) if values.len() == 3 * height * width => {
                let plane = height * width;
                let rgba = (0..plane).flat_map(|p| [byte(values[p]), byte(values[plane + p]), byte(values[2 * plane + p]), 255]).collect();
                Some(Preview { width, height, rgba })
            }
            Rendered::Image(_) => None,
        }
    }
}

/// A value in [-1, 1] as a colour byte.
fn byte(v: f32) -> u8 {
    ((v + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8
}

/// Latents `[1, 4, h, w]` (flattened `values`) as RGBA; `None` for another number of channels.
fn latent_rgba(values: &[f32], [_, channels, height, width]: [usize; 4]) -> Option<Preview> {
    if channels != SD_LATENT_RGB.len() || values.len() != channels * height * width {
        return None;
    }
    let plane = height * width;
    let mut rgba = Vec::with_capacity(4 * plane);
    for pixel in 0..plane {
        for colour in 0..3 {
            let v: f32 = SD_LATENT_RGB.iter().enumerate().map(|(c, row)| values[c * plane + pixel] * row[colour]).sum();
            rgba.push(byte(v));
        }
        rgba.push(255);
    }
    Some(Preview { width, height, rgba })
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, TensorData};

    use super::*;
    use crate::schedulers::{self, SchedulerConfig, SchedulerKind};

    /// Latents noised from known clean ones give those back, for each kind of prediction and
    /// both kinds of latent scale (DDPM's and the sigma schedulers').
    #[test]
    fn denoising_a_known_noising_gives_the_clean_latents() {
        let device = Device::flex();
        let tensor = |values: Vec<f32>| Tensor::<4>::from_data(TensorData::new(values, [1, 4, 1, 2]), &device);
        let (clean, noise) = (vec![0.5, -1.0, 2.0, 0.0, 1.5, -0.5, 0.25, 1.0], vec![1.0, 0.3, -0.7, 2.0, -1.2, 0.1, 0.9, -0.4]);
        for (class, kind, prediction) in [
            ("DDIMScheduler", SchedulerKind::Ddim, "epsilon"),
            ("DDIMScheduler", SchedulerKind::Ddim, "v_prediction"),
            ("EulerDiscreteScheduler", SchedulerKind::Euler, "epsilon"),
            ("EulerDiscreteScheduler", SchedulerKind::Euler, "v_prediction"),
        ] {
            let config = SchedulerConfig::from_json(&format!(r#"{{"_class_name": "{class}", "prediction_type": "{prediction}"}}"#)).unwrap();
            let scheduler = schedulers::build(kind, &config, 10).unwrap();
            let index = 3;
            let sample = scheduler.add_noise(tensor(clean.clone()), tensor(noise.clone()), index);
            // The scales as `add_noise` applies them, read back, so the test does not take them on trust.
            let scalar = |x0: f32, eps: f32| scheduler.add_noise(tensor(vec![x0; 8]), tensor(vec![eps; 8]), index).into_data().try_to_vec::<f32>().unwrap()[0];
            let (a, b) = (scalar(1.0, 0.0), scalar(0.0, 1.0));
            let c = (a * a + b * b).sqrt();
            let output = match prediction {
                "epsilon" => noise.clone(),
                _ => clean.iter().zip(&noise).map(|(x0, e)| (a * e - b * x0) / c).collect(),
            };
            let ours = denoised(scheduler.as_ref(), index, sample, tensor(output)).into_data().try_to_vec::<f32>().unwrap();
            for (got, want) in ours.iter().zip(&clean) {
                assert!((got - want).abs() < 1e-4, "{class} {prediction}: {ours:?} vs {clean:?}");
            }
        }
    }

    #[test]
    fn maps_each_latent_pixel_through_the_factors() {
        // Two pixels: channel 0 at 1 (A1111's first row), then channel 3 at -1.
        let values = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0];
        let preview = Rendered::Latents([1, 4, 1, 2]).rgba(&values).unwrap();
        let expected = |rgb: [f32; 3]| rgb.map(|v| ((v + 1.0) * 127.5).round() as u8);
        assert_eq!(&preview.rgba[..3], &expected([0.298, 0.207, 0.208]));
        assert_eq!(&preview.rgba[4..7], &expected([0.184, 0.271, 0.473]));
        assert_eq!((preview.width, preview.height, preview.rgba[3]), (2, 1, 255));
        assert!(Rendered::Latents([1, 2, 2, 1]).rgba(&values).is_none(), "not the SD latent space");
    }
}
