//! DPM-Solver++ (Lu et al. 2022) multistep, data prediction, orders 1 and 2, as diffusers'
//! `DPMSolverMultistepScheduler` with `algorithm_type="dpmsolver++"` (which Kiln always passes).

use burn::tensor::Tensor;

use super::common::{self, EPSILON, Params, Prediction, SAMPLE, Spacing, V_PREDICTION};
use super::{Scheduler, SchedulerError};

#[derive(Clone, Copy, PartialEq, Eq)]
enum SolverType {
    Midpoint,
    Heun,
}

pub(super) struct DpmSolver {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    sigmas_f64: Vec<f64>,
    prediction: Prediction,
    solver_order: usize,
    solver_type: SolverType,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_zero: bool,
    /// Denoised estimates of the last `solver_order` calls, oldest first.
    outputs: Vec<Tensor<4>>,
}

impl DpmSolver {
    pub fn new(p: &Params, steps: usize) -> Result<Self, SchedulerError> {
        let train = p.train_steps(steps)?;
        let solver_order = match p.int("solver_order", 2)? {
            order @ (1 | 2) => order as usize,
            order => return Err(p.unsupported("solver_order", order.to_string(), "1, 2".into())),
        };
        // diffusers maps the DEIS/UniPC solver types to midpoint.
        let solver_type = p.choice(
            "solver_type",
            "midpoint",
            &[
                ("midpoint", SolverType::Midpoint),
                ("heun", SolverType::Heun),
                ("logrho", SolverType::Midpoint),
                ("bh1", SolverType::Midpoint),
                ("bh2", SolverType::Midpoint),
            ],
        )?;
        let prediction = p.prediction(&[EPSILON, SAMPLE, V_PREDICTION])?;
        for switch in ["thresholding", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas"]
        {
            p.off(switch)?;
        }
        if let Some(variance_type) = p.opt_string("variance_type")? {
            return Err(p.unsupported("variance_type", format!("\"{variance_type}\""), "null".into()));
        }
        let lambda_min_clipped = p.f64("lambda_min_clipped", f64::NEG_INFINITY)?;
        if lambda_min_clipped != f64::NEG_INFINITY {
            return Err(p.unsupported("lambda_min_clipped", lambda_min_clipped.to_string(), "-Infinity".into()));
        }
        let lower_order_final = p.bool("lower_order_final", true)?;
        let euler_at_final = p.bool("euler_at_final", false)?;
        let karras = p.bool("use_karras_sigmas", false)?;
        let spacing = p.spacing("linspace")?;

        let (alphas_cumprod, train_sigmas) = common::sigma_schedule(p, train)?;
        // Integer timesteps over `steps + 1` slots with the last (0) dropped, except "trailing".
        let mut timesteps: Vec<i64> = match spacing {
            Spacing::Linspace => {
                common::linspace(train, steps + 1)[..steps].iter().map(|t| t.round_ties_even() as i64).collect()
            }
            Spacing::Leading => common::leading(train, steps + 1, p.int("steps_offset", 0)?)[..steps].to_vec(),
            Spacing::Trailing => common::trailing(p, train, steps)?,
        };
        let sigmas: Vec<f64> = if karras {
            let sigmas = common::karras(p, train_sigmas[0] as f64, train_sigmas[train - 1] as f64, steps)?;
            let log_sigmas: Vec<f32> = train_sigmas.iter().map(|s| s.ln()).collect();
            // Rounded to the nearest training timestep, except for cosine schedules where
            // diffusers leaves them fractional and the int64 cast truncates.
            let cosine = p.string("beta_schedule", "linear")? == "squaredcos_cap_v2";
            timesteps = sigmas
                .iter()
                .map(|&s| {
                    let t = common::sigma_to_t(s, &log_sigmas);
                    (if cosine { t.trunc() } else { t.round_ties_even() }) as i64
                })
                .collect();
            sigmas
        } else {
            timesteps.iter().map(|&t| common::interp(t as f64, &train_sigmas)).collect()
        };
        let final_sigma = common::final_sigma(p, &alphas_cumprod)?;
        let sigmas: Vec<f32> = sigmas.iter().map(|&s| s as f32).chain([final_sigma.unwrap_or(0.0)]).collect();
        Ok(Self {
            timesteps: timesteps.iter().map(|&t| t as f64).collect(),
            sigmas_f64: common::widen(&sigmas),
            sigmas,
            prediction,
            solver_order,
            solver_type,
            lower_order_final,
            euler_at_final,
            final_sigma_zero: final_sigma.is_none(),
            outputs: Vec::with_capacity(solver_order),
        })
    }

    /// The denoised estimate x0 (diffusers' `convert_model_output` for dpmsolver++).
    fn denoised(&self, model_output: Tensor<4>, index: usize, sample: Tensor<4>) -> Tensor<4> {
        let (alpha, sigma) = alpha_sigma(self.sigmas[index]);
        match self.prediction {
            Prediction::Epsilon => (sample - model_output.mul_scalar(sigma)).div_scalar(alpha),
            Prediction::Sample => model_output,
            Prediction::VPrediction => sample.mul_scalar(alpha) - model_output.mul_scalar(sigma),
        }
    }

    fn first_order(&self, denoised: Tensor<4>, index: usize, sample: Tensor<4>) -> Tensor<4> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[index + 1]);
        let (alpha_s, sigma_s) = alpha_sigma(self.sigmas[index]);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s, sigma_s);
        sample.mul_scalar(sigma_t / sigma_s) - denoised.mul_scalar(alpha_t * ((-h).exp() - 1.0))
    }

    fn second_order(&self, index: usize, sample: Tensor<4>) -> Tensor<4> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[index + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[index]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[index - 1]);
        let (lambda_t, lambda_s0) = (lambda(alpha_t, sigma_t), lambda(alpha_s0, sigma_s0));
        let h = lambda_t - lambda_s0;
        let r0 = (lambda_s0 - lambda(alpha_s1, sigma_s1)) / h;
        let (m0, m1) = (self.outputs[1].clone(), self.outputs[0].clone());
        let d1 = (m0.clone() - m1).mul_scalar(1.0 / r0);
        let decay = alpha_t * ((-h).exp() - 1.0);
        let x = sample.mul_scalar(sigma_t / sigma_s0) - m0.mul_scalar(decay);
        match self.solver_type {
            SolverType::Midpoint => x - d1.mul_scalar(0.5 * decay),
            SolverType::Heun => x + d1.mul_scalar(alpha_t * (((-h).exp() - 1.0) / h + 1.0)),
        }
    }
}

/// (alpha_t, sigma_t) of the variance-preserving process at Karras sigma `sigma`, in float32.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// Half log-SNR; +inf at sigma = 0, where the first-order update returns the denoised estimate.
fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

impl Scheduler for DpmSolver {
    fn prediction(&self) -> Prediction {
        self.prediction
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas_f64)
    }

    /// Variance-preserving, like the DDPM family, but at the call's sigma.
    fn noise_scales(&self, index: usize) -> (f32, f32) {
        alpha_sigma(self.sigmas[index])
    }

    fn step(
        &mut self,
        model_output: Tensor<4>,
        index: usize,
        sample: Tensor<4>,
        _noise: &mut dyn FnMut() -> Tensor<4>,
    ) -> Tensor<4> {
        let steps = self.timesteps.len();
        // A first-order last step avoids the instability of multistep updates near sigma = 0.
        let lower_order_final = index == steps - 1
            && (self.euler_at_final || (self.lower_order_final && steps < 15) || self.final_sigma_zero);
        let denoised = self.denoised(model_output, index, sample.clone());
        if self.outputs.len() == self.solver_order {
            self.outputs.remove(0);
        }
        self.outputs.push(denoised.clone());
        // `outputs` holds fewer than `solver_order` entries until enough calls have been made
        // (diffusers' `lower_order_nums`).
        if self.solver_order == 1 || self.outputs.len() < 2 || lower_order_final {
            self.first_order(denoised, index, sample)
        } else {
            self.second_order(index, sample)
        }
    }
}
