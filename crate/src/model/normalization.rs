//! diffusers' `AdaGroupNorm`: a group norm whose scale and shift come from the time embedding.
use burn::tensor::Tensor;

use super::nn::Linear;
use crate::error::Result;
use crate::kernels;
use crate::weights::Weights;

pub struct AdaGroupNorm {
    /// The time embedding to `[scale, shift]`, `2 × channels` wide.
    pub linear: Linear,
    /// The kernel's affine parameters, fixed at 1 and 0: the scale and shift are per batch row.
    ones: Tensor<1>,
    zeros: Tensor<1>,
    num_groups: usize,
    eps: f64,
}

impl AdaGroupNorm {
    pub fn load(w: &Weights, temb_channels: usize, channels: usize, num_groups: usize, eps: f64) -> Result<Self> {
        let linear = Linear::load(&w.pp("linear"), temb_channels, 2 * channels, true)?;
        let device = linear.weight.device();
        Ok(Self { linear, ones: Tensor::ones([channels], &device), zeros: Tensor::zeros([channels], &device), num_groups, eps })
    }

    /// `group_norm(x) · (1 + scale) + shift`, `x` `[B, C, H, W]`, `temb` `[B, T]`.
    pub fn forward(&self, x: Tensor<4>, temb: &Tensor<2>) -> Tensor<4> {
        let channels = self.ones.dims()[0];
        let [b, _] = temb.dims();
        let emb = self.linear.forward(temb.clone()).reshape([b, 2 * channels, 1, 1]);
        let (scale, shift) = (emb.clone().narrow(1, 0, channels), emb.narrow(1, channels, channels));
        let normed = kernels::group_norm(x, self.ones.clone(), self.zeros.clone(), self.num_groups, self.eps, false);
        normed * scale.add_scalar(1.0) + shift
    }
}
