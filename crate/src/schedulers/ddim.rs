//! DDIM (Song et al. 2020), deterministic (eta = 0), as diffusers' `DDIMScheduler`.

use burn::tensor::Tensor;

use super::common::{self, DDPM_BETAS, EPSILON, Params, Prediction, SAMPLE, V_PREDICTION};
use super::{Scheduler, SchedulerError};

pub(super) struct Ddim {
    timesteps: Vec<f64>,
    train_timesteps: Vec<i64>,
    alphas_cumprod: Vec<f32>,
    /// Alpha product used when the previous timestep falls below 0 (`set_alpha_to_one`).
    final_alpha_cumprod: f32,
    /// diffusers finds the previous timestep as `t - train // steps`, whatever the spacing.
    step_ratio: i64,
    prediction: Prediction,
    clip_range: Option<f32>,
}

impl Ddim {
    pub fn new(p: &Params, steps: usize) -> Result<Self, SchedulerError> {
        let train = p.train_steps(steps)?;
        let prediction = p.prediction(&[EPSILON, SAMPLE, V_PREDICTION])?;
        p.off("thresholding")?;
        let clip_range = match p.bool("clip_sample", true)? {
            true => Some(p.f64("clip_sample_range", 1.0)? as f32),
            false => None,
        };
        let zero_snr = p.bool("rescale_betas_zero_snr", false)?;
        let alphas_cumprod = common::alphas_cumprod(p, train, DDPM_BETAS, zero_snr)?;
        let final_alpha_cumprod = if p.bool("set_alpha_to_one", true)? { 1.0 } else { alphas_cumprod[0] };
        let train_timesteps = common::integer_timesteps(p, p.spacing("leading")?, train, steps)?;
        common::check_in_range(p, steps, train, &train_timesteps)?;
        Ok(Self {
            timesteps: train_timesteps.iter().map(|&t| t as f64).collect(),
            train_timesteps,
            alphas_cumprod,
            final_alpha_cumprod,
            step_ratio: (train / steps) as i64,
            prediction,
            clip_range,
        })
    }
}

impl Scheduler for Ddim {
    fn prediction(&self) -> Prediction {
        self.prediction
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn noise_scales(&self, index: usize) -> (f32, f32) {
        common::ddpm_scales(&self.alphas_cumprod, self.train_timesteps[index] as usize)
    }

    fn step(
        &mut self,
        model_output: Tensor<4>,
        index: usize,
        sample: Tensor<4>,
        _noise: &mut dyn FnMut() -> Tensor<4>,
    ) -> Tensor<4> {
        let t = self.train_timesteps[index];
        let prev = t - self.step_ratio;
        let alpha_t = self.alphas_cumprod[t as usize];
        let alpha_prev = if prev >= 0 { self.alphas_cumprod[prev as usize] } else { self.final_alpha_cumprod };
        let beta_t = 1.0 - alpha_t;
        let (pred_original, pred_epsilon) = match self.prediction {
            Prediction::Epsilon => {
                ((sample - model_output.clone().mul_scalar(beta_t.sqrt())).div_scalar(alpha_t.sqrt()), model_output)
            }
            Prediction::Sample => {
                let eps = (sample - model_output.clone().mul_scalar(alpha_t.sqrt())).div_scalar(beta_t.sqrt());
                (model_output, eps)
            }
            Prediction::VPrediction => (
                sample.clone().mul_scalar(alpha_t.sqrt()) - model_output.clone().mul_scalar(beta_t.sqrt()),
                model_output.mul_scalar(alpha_t.sqrt()) + sample.mul_scalar(beta_t.sqrt()),
            ),
        };
        let pred_original = match self.clip_range {
            Some(range) => pred_original.clamp(-range, range),
            None => pred_original,
        };
        // With eta = 0 the noise term vanishes and the direction keeps all of 1 - alpha_prev.
        pred_original.mul_scalar(alpha_prev.sqrt()) + pred_epsilon.mul_scalar((1.0 - alpha_prev).sqrt())
    }
}
