//! diffusers' `Timesteps` (sinusoidal projection) and `TimestepEmbedding` (two-layer MLP).
use burn::tensor::activation::silu;
use burn::tensor::{Device, Tensor, TensorData};

use super::nn::Linear;
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

pub struct TimestepEmbedding {
    pub linear_1: Linear,
    pub linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn load(w: &Weights, d_in: usize, d_out: usize) -> Result<Self> {
        Ok(Self { linear_1: Linear::load(&w.pp("linear_1"), d_in, d_out, true)?, linear_2: Linear::load(&w.pp("linear_2"), d_out, d_out, true)? })
    }

    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.linear_2.forward(silu(self.linear_1.forward(x)))
    }
}
