//! PNDM's linear multistep part (PLMS, Liu et al. 2022), as diffusers' `PNDMScheduler` with
//! `skip_prk_steps=True` (every Stable Diffusion config sets it).

use burn::tensor::Tensor;

use super::common::{self, DDPM_BETAS, EPSILON, Params, Prediction, V_PREDICTION};
use super::{Scheduler, SchedulerError};

pub(super) struct Pndm {
    timesteps: Vec<f64>,
    train_timesteps: Vec<i64>,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    /// `train // steps`: diffusers' distance to the previous timestep, whatever the spacing.
    step_ratio: i64,
    prediction: Prediction,
    /// The last (up to four) model outputs, oldest first.
    ets: Vec<Tensor<4>>,
    /// The sample of the first call, reused by the second (PLMS warm-up is a two-evaluation
    /// Heun-like step).
    first_sample: Option<Tensor<4>>,
    /// Calls made so far (diffusers' `counter`): the warm-up depends on it, not on the index,
    /// since img2img starts part-way through the timesteps.
    counter: usize,
}

impl Pndm {
    pub fn new(p: &Params, steps: usize) -> Result<Self, SchedulerError> {
        let train = p.train_steps(steps)?;
        if !p.bool("skip_prk_steps", false)? {
            return Err(p.unsupported(
                "skip_prk_steps",
                "false".into(),
                "true (only the PLMS steps are implemented, not the Runge-Kutta warm-up)".into(),
            ));
        }
        let prediction = p.prediction(&[EPSILON, V_PREDICTION])?;
        let alphas_cumprod = common::alphas_cumprod(p, train, DDPM_BETAS, false)?;
        let final_alpha_cumprod = if p.bool("set_alpha_to_one", false)? { 1.0 } else { alphas_cumprod[0] };
        let descending = common::integer_timesteps(p, p.spacing("leading")?, train, steps)?;
        // PLMS evaluates the second timestep twice: t0, t1, t1, t2, ...
        let mut train_timesteps = descending.clone();
        if steps >= 2 {
            train_timesteps.insert(1, descending[1]);
        }
        let step_ratio = (train / steps) as i64;
        // The second call looks one ratio above its timestep, which is at most entry 1's.
        let lookups: Vec<i64> =
            train_timesteps.iter().copied().chain(train_timesteps.get(1).map(|t| t + step_ratio)).collect();
        common::check_in_range(p, steps, train, &lookups)?;
        Ok(Self {
            timesteps: train_timesteps.iter().map(|&t| t as f64).collect(),
            train_timesteps,
            alphas_cumprod,
            final_alpha_cumprod,
            step_ratio,
            prediction,
            ets: Vec::with_capacity(4),
            first_sample: None,
            counter: 0,
        })
    }

    /// diffusers' `_get_prev_sample`: formula (9) of the PNDM paper, in float32 coefficients.
    fn prev_sample(&self, sample: Tensor<4>, t: i64, prev: i64, model_output: Tensor<4>) -> Tensor<4> {
        let alpha_t = self.alphas_cumprod[t as usize];
        let alpha_prev = if prev >= 0 { self.alphas_cumprod[prev as usize] } else { self.final_alpha_cumprod };
        let beta_t = 1.0 - alpha_t;
        let beta_prev = 1.0 - alpha_prev;
        let model_output = match self.prediction {
            Prediction::VPrediction => {
                model_output.mul_scalar(alpha_t.sqrt()) + sample.clone().mul_scalar(beta_t.sqrt())
            }
            _ => model_output,
        };
        let sample_coeff = (alpha_prev / alpha_t).sqrt();
        let denom = alpha_t * beta_prev.sqrt() + (alpha_t * beta_t * alpha_prev).sqrt();
        sample.mul_scalar(sample_coeff) - model_output.mul_scalar(alpha_prev - alpha_t).div_scalar(denom)
    }
}

impl Scheduler for Pndm {
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
        let mut t = self.train_timesteps[index];
        let mut prev = t - self.step_ratio;
        let counter = self.counter;
        self.counter += 1;
        if counter == 1 {
            // The repeated timestep: redo the first step from its sample with averaged outputs.
            prev = t;
            t += self.step_ratio;
        } else {
            if self.ets.len() == 4 {
                self.ets.remove(0);
            }
            self.ets.push(model_output.clone());
        }
        let e = |back: usize| self.ets[self.ets.len() - back].clone();
        let (model_output, sample) = match (self.ets.len(), counter) {
            (1, 0) => {
                self.first_sample = Some(sample.clone());
                (model_output, sample)
            }
            (1, _) => {
                let first = self.first_sample.take().expect("the second PLMS call follows the first");
                ((model_output + e(1)).div_scalar(2.0), first)
            }
            (2, _) => ((e(1).mul_scalar(3.0) - e(2)).div_scalar(2.0), sample),
            (3, _) => ((e(1).mul_scalar(23.0) - e(2).mul_scalar(16.0) + e(3).mul_scalar(5.0)).div_scalar(12.0), sample),
            _ => {
                let sum = e(1).mul_scalar(55.0) - e(2).mul_scalar(59.0) + e(3).mul_scalar(37.0) - e(4).mul_scalar(9.0);
                (sum.mul_scalar(1.0f64 / 24.0), sample)
            }
        };
        self.prev_sample(sample, t, prev, model_output)
    }
}
