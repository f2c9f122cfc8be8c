//! The layers every model shares, loaded from PyTorch-layout weights.
use burn::tensor::module::{conv2d, layer_norm, linear};
use burn::tensor::ops::ConvOptions;
use burn::tensor::Tensor;

use crate::error::Result;
use crate::quant;
use crate::weights::Weights;

/// `torch.nn.Linear`. burn's `linear` wants the weight as `[in, out]`; the PyTorch
/// `[out, in]` tensor is used through a transposed view, so no second copy exists. A quantized
/// (or f16) weight stays so and is widened to f32 for each call: burn's matmul that
/// dequantizes inside the kernel took seconds per call on lavapipe, dequantize-then-matmul
/// milliseconds.
pub struct Linear {
    pub weight: Tensor<2>,
    pub bias: Option<Tensor<1>>,
}

impl Linear {
    pub fn load(w: &Weights, d_in: usize, d_out: usize, bias: bool) -> Result<Self> {
        let weight = w.matrix("weight", &[d_out, d_in])?.transpose();
        let bias = if bias { Some(w.tensor("bias", [d_out])?) } else { None };
        Ok(Self { weight, bias })
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        linear(x, quant::to_f32(self.weight.clone()), self.bias.clone())
    }
}

/// `torch.nn.Conv2d` with square kernels. The weight is kept as the matrix
/// `[out, in·k·k]`, quantized (or f16) when stored so, and widened for each call: only one
/// layer's weight is ever in f32 at a time.
pub struct Conv2d {
    pub weight: Tensor<2>,
    pub bias: Tensor<1>,
    shape: [usize; 4],
    options: ConvOptions<2>,
}

impl Conv2d {
    /// A conv with symmetric padding.
    pub fn load(w: &Weights, c_in: usize, c_out: usize, kernel: usize, stride: usize, padding: usize) -> Result<Self> {
        Self::load_padded(w, c_in, c_out, kernel, stride, (padding, padding))
    }

    /// A conv with `(begin, end)` padding on both spatial axes (the VAE encoder's
    /// downsampler pads only right and bottom).
    pub fn load_padded(w: &Weights, c_in: usize, c_out: usize, kernel: usize, stride: usize, padding: (usize, usize)) -> Result<Self> {
        let shape = [c_out, c_in, kernel, kernel];
        let weight = w.matrix("weight", &shape)?;
        let bias = w.tensor("bias", [c_out])?;
        let options = ConvOptions { stride: [stride; 2], padding: [padding; 2], dilation: [1; 2], groups: 1 };
        Ok(Self { weight, bias, shape, options })
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let weight = quant::to_f32(self.weight.clone()).reshape(self.shape);
        conv2d(x, weight, Some(self.bias.clone()), self.options.clone())
    }
}

/// `torch.nn.GroupNorm` over `[N, C, ...]`, statistics in f32 like PyTorch.
pub struct GroupNorm {
    pub weight: Tensor<1>,
    pub bias: Tensor<1>,
    num_groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn load(w: &Weights, num_groups: usize, channels: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: w.tensor("weight", [channels])?, bias: w.tensor("bias", [channels])?, num_groups, eps })
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [n, c, h, wd] = x.dims();
        let grouped = x.reshape([n, self.num_groups, (c / self.num_groups) * h * wd]);
        let (var, mean) = grouped.clone().var_mean_bias(2);
        let normed = (grouped - mean) / (var + self.eps).sqrt();
        let normed = normed.reshape([n, c, h, wd]);
        normed * self.weight.clone().reshape([1, c, 1, 1]) + self.bias.clone().reshape([1, c, 1, 1])
    }
}

/// `torch.nn.LayerNorm` over the last axis.
pub struct LayerNorm {
    pub weight: Tensor<1>,
    pub bias: Tensor<1>,
    eps: f64,
}

impl LayerNorm {
    pub fn load(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: w.tensor("weight", [dim])?, bias: w.tensor("bias", [dim])?, eps })
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        layer_norm(x, self.weight.clone(), Some(self.bias.clone()), self.eps)
    }
}
