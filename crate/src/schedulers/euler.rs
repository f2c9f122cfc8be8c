//! Euler's method on the probability-flow ODE (Karras et al. 2022, algorithm 2 without churn), as
//! diffusers' `EulerDiscreteScheduler`.

use burn::tensor::Tensor;

use super::common::{self, EPSILON, Params, Prediction, SAMPLE, Spacing, V_PREDICTION};
use super::{Scheduler, SchedulerError};

pub(super) struct Euler {
    timesteps: Vec<f64>,
    /// Float32 sigmas, one per call plus the final one.
    sigmas: Vec<f32>,
    sigmas_f64: Vec<f64>,
    init_noise_sigma: f64,
    prediction: Prediction,
}

impl Euler {
    pub fn new(p: &Params, steps: usize) -> Result<Self, SchedulerError> {
        let train = p.train_steps(steps)?;
        let prediction = p.prediction(&[EPSILON, V_PREDICTION, SAMPLE, ("original_sample", Prediction::Sample)])?;
        let log_linear = p.choice("interpolation_type", "linear", &[("linear", false), ("log_linear", true)])?;
        p.off("use_exponential_sigmas")?;
        p.off("use_beta_sigmas")?;
        let karras = p.bool("use_karras_sigmas", false)?;
        let continuous = p.choice("timestep_type", "discrete", &[("discrete", false), ("continuous", true)])?;
        let spacing = p.spacing("linspace")?;

        let (alphas_cumprod, train_sigmas) = common::sigma_schedule(p, train)?;
        // diffusers keeps these timesteps in numpy float32.
        let mut timesteps: Vec<f64> = common::euler_timesteps(p, spacing, train, steps)?;
        let mut sigmas: Vec<f64> = if log_linear {
            log_linear_sigmas(&train_sigmas, steps)
        } else {
            timesteps.iter().map(|&t| common::interp(t, &train_sigmas)).collect()
        };
        if karras {
            sigmas = common::karras(p, sigmas[sigmas.len() - 1], sigmas[0], steps)?;
            let log_sigmas: Vec<f32> = train_sigmas.iter().map(|s| s.ln()).collect();
            timesteps = sigmas.iter().map(|&s| common::sigma_to_t(s, &log_sigmas) as f32 as f64).collect();
        }
        let sigmas: Vec<f32> =
            sigmas.iter().map(|&s| s as f32).chain([common::final_sigma(p, &alphas_cumprod)?.unwrap_or(0.0)]).collect();
        if continuous && prediction == Prediction::VPrediction {
            // The UNet of continuous-time v models takes c_noise = ln(sigma) / 4 (EDM preconditioning).
            timesteps = sigmas[..steps].iter().map(|s| (0.25 * s.ln()) as f64).collect();
        }
        Ok(Self {
            timesteps,
            sigmas_f64: common::widen(&sigmas),
            init_noise_sigma: init_noise_sigma(&sigmas, spacing) as f64,
            sigmas,
            prediction,
        })
    }
}

/// `interpolation_type = "log_linear"`: `steps + 1` sigmas evenly spaced in log from the largest
/// training sigma to the smallest, so the last step ends at the smallest rather than at 0 (the
/// latent upscaler's schedule). In float32 as `torch.linspace(...).exp()` computes them.
fn log_linear_sigmas(train_sigmas: &[f32], steps: usize) -> Vec<f64> {
    let (start, end) = (train_sigmas[train_sigmas.len() - 1].ln(), train_sigmas[0].ln());
    let step = (end - start) / steps as f32;
    let halfway = (steps + 1) / 2;
    (0..=steps)
        .map(|i| {
            let log = if i < halfway { start + step * i as f32 } else { end - step * (steps - i) as f32 };
            log.exp() as f64
        })
        .collect()
}

/// The largest sigma, or for "leading" spacing the standard deviation of sigma-scaled noise on top
/// of unit-variance latents (diffusers' float32 `init_noise_sigma`).
pub(super) fn init_noise_sigma(sigmas: &[f32], spacing: Spacing) -> f32 {
    let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    match spacing {
        Spacing::Leading => (max * max + 1.0).sqrt(),
        Spacing::Linspace | Spacing::Trailing => max,
    }
}

/// Input scaling `1 / sqrt(sigma^2 + 1)` in float32, shared with Euler ancestral.
pub(super) fn scale_input(sample: Tensor<4>, sigma: f32) -> Tensor<4> {
    sample.div_scalar((sigma * sigma + 1.0).sqrt())
}

/// The v-prediction denoised estimate, shared with Euler ancestral.
pub(super) fn v_denoised(model_output: Tensor<4>, sample: Tensor<4>, sigma: f32) -> Tensor<4> {
    model_output.mul_scalar(-sigma / (sigma * sigma + 1.0).sqrt()) + sample.div_scalar(sigma * sigma + 1.0)
}

impl Scheduler for Euler {
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
        _noise: &mut dyn FnMut() -> Tensor<4>,
    ) -> Tensor<4> {
        let sigma = self.sigmas[index];
        let denoised = match self.prediction {
            Prediction::Epsilon => sample.clone() - model_output.mul_scalar(sigma),
            Prediction::Sample => model_output,
            Prediction::VPrediction => v_denoised(model_output, sample.clone(), sigma),
        };
        let derivative = (sample.clone() - denoised).div_scalar(sigma);
        sample + derivative.mul_scalar(self.sigmas[index + 1] - sigma)
    }
}
