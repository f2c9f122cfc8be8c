//! Ancestral Euler sampling (k-diffusion's `sample_euler_ancestral`), as diffusers'
//! `EulerAncestralDiscreteScheduler`: each step goes down to `sigma_down` deterministically and
//! adds fresh noise of size `sigma_up`.

use burn::tensor::Tensor;

use super::common::{self, EPSILON, Params, Prediction, V_PREDICTION};
use super::euler::{init_noise_sigma, scale_input, v_denoised};
use super::{Scheduler, SchedulerError};

pub(super) struct EulerAncestral {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    sigmas_f64: Vec<f64>,
    init_noise_sigma: f64,
    prediction: Prediction,
}

impl EulerAncestral {
    pub fn new(p: &Params, steps: usize) -> Result<Self, SchedulerError> {
        let train = p.train_steps(steps)?;
        // diffusers raises NotImplementedError for prediction_type="sample" here.
        let prediction = p.prediction(&[EPSILON, V_PREDICTION])?;
        let spacing = p.spacing("linspace")?;

        let (_, train_sigmas) = common::sigma_schedule(p, train)?;
        let timesteps: Vec<f64> = common::euler_timesteps(p, spacing, train, steps)?;
        let sigmas: Vec<f32> =
            timesteps.iter().map(|&t| common::interp(t, &train_sigmas) as f32).chain([0.0]).collect();
        Ok(Self {
            timesteps,
            sigmas_f64: common::widen(&sigmas),
            init_noise_sigma: init_noise_sigma(&sigmas, spacing) as f64,
            sigmas,
            prediction,
        })
    }
}

impl Scheduler for EulerAncestral {
    fn prediction(&self) -> Prediction {
        self.prediction
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas_f64)
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: Tensor<4>, index: usize) -> Tensor<4> {
        scale_input(sample, self.sigmas[index])
    }

    fn noise_scales(&self, index: usize) -> (f32, f32) {
        (1.0, self.sigmas[index])
    }

    fn step(
        &mut self,
        model_output: Tensor<4>,
        index: usize,
        sample: Tensor<4>,
        noise: &mut dyn FnMut() -> Tensor<4>,
    ) -> Tensor<4> {
        let (sigma, sigma_to) = (self.sigmas[index], self.sigmas[index + 1]);
        let denoised = match self.prediction {
            Prediction::Epsilon => sample.clone() - model_output.mul_scalar(sigma),
            Prediction::VPrediction => v_denoised(model_output, sample.clone(), sigma),
            Prediction::Sample => unreachable!("refused in EulerAncestral::new"),
        };
        let sigma_up = (sigma_to * sigma_to * (sigma * sigma - sigma_to * sigma_to) / (sigma * sigma)).sqrt();
        let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).sqrt();
        let derivative = (sample.clone() - denoised).div_scalar(sigma);
        let prev = sample + derivative.mul_scalar(sigma_down - sigma);
        prev + noise().mul_scalar(sigma_up)
    }
}
