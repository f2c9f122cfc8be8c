//! diffusers' `Timesteps` (sinusoidal projection), `GaussianFourierProjection` and
//! `TimestepEmbedding` (two-layer MLP).
use burn::tensor::{Device, Tensor, TensorData};

use super::nn::{Activation, Linear};
use crate::error::Result;
use crate::weights::Weights;

/// Sinusoidal embeddings of `values` with `dim` channels each, side by side in one row
/// (`[batch, values × dim]`: a timestep, or SDXL's six time ids), the row repeated per batch
/// entry. Computed on the host in f32, in diffusers' order of operations, because the values
/// are host values anyway.
pub fn timestep_embedding(values: &[f32], batch: usize, dim: usize, flip_sin_to_cos: bool, freq_shift: f64, device: &Device) -> Tensor<2> {
    let half = dim / 2;
    let mut row = vec![0.0f32; values.len() * dim];
    for (&t, out) in values.iter().zip(row.chunks_exact_mut(dim)) {
        for i in 0..half {
            let exponent = -(10000f64.ln() as f32) * i as f32 / (half as f32 - freq_shift as f32);
            let arg = t * exponent.exp();
            let (sin, cos) = (arg.sin(), arg.cos());
            let (first, second) = if flip_sin_to_cos { (cos, sin) } else { (sin, cos) };
            out[i] = first;
            out[half + i] = second;
        }
    }
    let width = row.len();
    let values: Vec<f32> = std::iter::repeat_n(row, batch).flatten().collect();
    Tensor::from_data(TensorData::new(values, [batch, width]), device)
}

/// `GaussianFourierProjection` as `UNet2DConditionModel` builds it for `time_embedding_type =
/// "fourier"` (no log, a learned frequency table): the latent upscaler's noise-level embedding.
pub struct GaussianFourierProjection {
    /// The frequencies, kept on the host: the timestep is a host value.
    weight: Vec<f32>,
    flip_sin_to_cos: bool,
}

impl GaussianFourierProjection {
    pub fn load(w: &Weights, half: usize, flip_sin_to_cos: bool) -> Result<Self> {
        Ok(Self { weight: w.values("weight", &[half])?, flip_sin_to_cos })
    }

    /// `[batch, 2 × half]`: sin and cos of `t · weight · 2π` in f32, in diffusers' order of operations.
    pub fn forward(&self, t: f32, batch: usize, device: &Device) -> Tensor<2> {
        let args: Vec<f32> = self.weight.iter().map(|&w| t * w * 2.0 * std::f32::consts::PI).collect();
        let (sin, cos) = (args.iter().map(|a| a.sin()), args.iter().map(|a| a.cos()));
        let row: Vec<f32> = if self.flip_sin_to_cos { cos.chain(sin).collect() } else { sin.chain(cos).collect() };
        let width = row.len();
        let values: Vec<f32> = std::iter::repeat_n(row, batch).flatten().collect();
        Tensor::from_data(TensorData::new(values, [batch, width]), device)
    }
}

/// `linear_2(act(linear_1(x + cond_proj(condition))))`, then `post_act` when the config names one.
pub struct TimestepEmbedding {
    pub linear_1: Linear,
    pub linear_2: Linear,
    /// `time_cond_proj_dim`'s projection of a condition into the input (the latent upscaler's
    /// noise level and pooled text).
    pub cond_proj: Option<Linear>,
    act: Activation,
    post_act: Option<Activation>,
}

impl TimestepEmbedding {
    /// The plain MLP with SiLU, as SD's time and SDXL's added embeddings are.
    pub fn load(w: &Weights, d_in: usize, d_out: usize) -> Result<Self> {
        Self::load_with(w, d_in, d_out, None, Activation::Silu, None)
    }

    pub fn load_with(w: &Weights, d_in: usize, d_out: usize, cond_dim: Option<usize>, act: Activation, post_act: Option<Activation>) -> Result<Self> {
        let cond_proj = match cond_dim {
            Some(dim) => Some(Linear::load(&w.pp("cond_proj"), dim, d_in, false)?),
            None => None,
        };
        Ok(Self { linear_1: Linear::load(&w.pp("linear_1"), d_in, d_out, true)?, linear_2: Linear::load(&w.pp("linear_2"), d_out, d_out, true)?, cond_proj, act, post_act })
    }

    pub fn forward(&self, x: Tensor<2>, condition: Option<Tensor<2>>) -> Tensor<2> {
        let x = match (&self.cond_proj, condition) {
            (Some(proj), Some(condition)) => x + proj.forward(condition),
            _ => x,
        };
        let out = self.linear_2.forward(self.act.apply(self.linear_1.forward(x)));
        match self.post_act {
            Some(act) => act.apply(out),
            None => out,
        }
    }
}
