//! Latent consistency model sampling (Luo et al. 2023), as diffusers' `LCMScheduler`: each call
//! predicts the clean latents through the consistency boundary condition, then re-noises them to
//! the next timestep with fresh noise.

use burn::tensor::Tensor;

use super::common::{self, EPSILON, LCM_BETAS, Params, Prediction, SAMPLE, V_PREDICTION};
use super::{Scheduler, SchedulerError};

pub(super) struct Lcm {
    timesteps: Vec<f64>,
    train_timesteps: Vec<usize>,
    alphas_cumprod: Vec<f32>,
    prediction: Prediction,
    clip_range: Option<f32>,
    timestep_scaling: f32,
}

impl Lcm {
    pub fn new(p: &Params, steps: usize) -> Result<Self, SchedulerError> {
        let train = p.train_steps(steps)?;
        let original_steps = p.int("original_inference_steps", 50)?;
        if original_steps < 1 || original_steps as usize > train {
            return Err(p.unsupported(
                "original_inference_steps",
                original_steps.to_string(),
                format!("1 to num_train_timesteps ({train})"),
            ));
        }
        let original_steps = original_steps as usize;
        if steps > original_steps {
            return Err(p.invalid_steps(
                steps,
                format!(
                    "LCM samples a subset of its {original_steps}-step distillation schedule (original_inference_steps)"
                ),
            ));
        }
        let prediction = p.prediction(&[EPSILON, SAMPLE, V_PREDICTION])?;
        p.off("thresholding")?;
        let clip_range = match p.bool("clip_sample", false)? {
            true => Some(p.f64("clip_sample_range", 1.0)? as f32),
            false => None,
        };
        let zero_snr = p.bool("rescale_betas_zero_snr", false)?;
        let alphas_cumprod = common::alphas_cumprod(p, train, LCM_BETAS, zero_snr)?;

        // The distillation schedule, descending, sampled at evenly spaced (floored) positions.
        let k = train / original_steps;
        let origin: Vec<usize> = (1..=original_steps).rev().map(|i| i * k - 1).collect();
        let train_timesteps: Vec<usize> = common::np_linspace(0.0, original_steps as f64, steps, false)
            .into_iter()
            .map(|i| origin[i.floor() as usize])
            .collect();
        Ok(Self {
            timesteps: train_timesteps.iter().map(|&t| t as f64).collect(),
            train_timesteps,
            alphas_cumprod,
            prediction,
            clip_range,
            timestep_scaling: p.f64("timestep_scaling", 10.0)? as f32,
        })
    }
}

impl Scheduler for Lcm {
    fn prediction(&self) -> Prediction {
        self.prediction
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn noise_scales(&self, index: usize) -> (f32, f32) {
        common::ddpm_scales(&self.alphas_cumprod, self.train_timesteps[index])
    }

    fn step(
        &mut self,
        model_output: Tensor<4>,
        index: usize,
        sample: Tensor<4>,
        noise: &mut dyn FnMut() -> Tensor<4>,
    ) -> Tensor<4> {
        let t = self.train_timesteps[index];
        let alpha_t = self.alphas_cumprod[t];
        let beta_t = 1.0 - alpha_t;
        // Boundary-condition scalings with sigma_data = 0.5, in float32 as torch computes them
        // from the int64 timestep.
        let scaled = t as f32 * self.timestep_scaling;
        let c_skip = 0.25 / (scaled * scaled + 0.25);
        let c_out = scaled / (scaled * scaled + 0.25).sqrt();
        let pred_original = match self.prediction {
            Prediction::Epsilon => (sample.clone() - model_output.mul_scalar(beta_t.sqrt())).div_scalar(alpha_t.sqrt()),
            Prediction::Sample => model_output,
            Prediction::VPrediction => {
                sample.clone().mul_scalar(alpha_t.sqrt()) - model_output.mul_scalar(beta_t.sqrt())
            }
        };
        let pred_original = match self.clip_range {
            Some(range) => pred_original.clamp(-range, range),
            None => pred_original,
        };
        let denoised = pred_original.mul_scalar(c_out) + sample.mul_scalar(c_skip);
        match self.train_timesteps.get(index + 1) {
            Some(&prev) => {
                let alpha_prev = self.alphas_cumprod[prev];
                denoised.mul_scalar(alpha_prev.sqrt()) + noise().mul_scalar((1.0 - alpha_prev).sqrt())
            }
            None => denoised,
        }
    }
}
