//! The layers every model shares, loaded from PyTorch-layout weights. Each runs as one of the
//! engine's kernels on the GPU (`crate::kernels`), with what follows it folded in where the
//! model allows (`forward_with`).
use burn::tensor::Tensor;
use burn::tensor::activation::{gelu, silu};

use crate::error::{Error, Result};
use crate::kernels::{self, Conv2dEpilogue, LinearEpilogue};
use crate::quant;
use crate::weights::Weights;

/// `torch.nn.Linear`, its weight kept as PyTorch lays it out (`[out, in]`). An f16 weight stays
/// f16 and the kernel widens each value as it loads it; a quantized one is dequantized for
/// each call (burn's matmul that dequantizes inside the kernel took seconds per call on
/// lavapipe, dequantize-then-multiply milliseconds).
pub struct Linear {
    pub weight: Tensor<2>,
    pub bias: Option<Tensor<1>>,
}

impl Linear {
    pub fn load(w: &Weights, d_in: usize, d_out: usize, bias: bool) -> Result<Self> {
        let weight = w.matrix("weight", &[d_out, d_in])?;
        let bias = if bias { Some(w.tensor("bias", [d_out])?) } else { None };
        Ok(Self { weight, bias })
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.forward_with(x, LinearEpilogue::default())
    }

    pub fn forward_with<const D: usize>(&self, x: Tensor<D>, epilogue: LinearEpilogue<D>) -> Tensor<D> {
        kernels::linear(x, quant::for_kernel(self.weight.clone()), self.bias.clone(), epilogue)
    }
}

/// `torch.nn.Conv2d` with square kernels. The weight is kept as the matrix
/// `[out, in·k·k]` the kernel reads, in f16 or quantized when stored so; a quantized one is
/// dequantized for each call, so only one layer's weight is ever in f32 at a time.
pub struct Conv2d {
    pub weight: Tensor<2>,
    pub bias: Tensor<1>,
    kernel: usize,
    stride: usize,
    padding: (usize, usize),
}

impl Conv2d {
    /// A conv with symmetric padding.
    pub fn load(w: &Weights, c_in: usize, c_out: usize, kernel: usize, stride: usize, padding: usize) -> Result<Self> {
        Self::load_padded(w, c_in, c_out, kernel, stride, (padding, padding))
    }

    /// A conv without a bias (`bias=False`), symmetric padding and stride 1.
    pub fn load_unbiased(w: &Weights, c_in: usize, c_out: usize, kernel: usize, padding: usize) -> Result<Self> {
        let weight = w.matrix("weight", &[c_out, c_in, kernel, kernel])?;
        let bias = Tensor::zeros([c_out], &weight.device());
        Ok(Self { weight, bias, kernel, stride: 1, padding: (padding, padding) })
    }

    /// A conv with `(begin, end)` padding on both spatial axes (the VAE encoder's
    /// downsampler pads only right and bottom).
    pub fn load_padded(w: &Weights, c_in: usize, c_out: usize, kernel: usize, stride: usize, padding: (usize, usize)) -> Result<Self> {
        let weight = w.matrix("weight", &[c_out, c_in, kernel, kernel])?;
        let bias = w.tensor("bias", [c_out])?;
        Ok(Self { weight, bias, kernel, stride, padding })
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.forward_with(x, Conv2dEpilogue::default())
    }

    pub fn forward_with(&self, x: Tensor<4>, epilogue: Conv2dEpilogue) -> Tensor<4> {
        kernels::conv2d(x, quant::for_kernel(self.weight.clone()), self.bias.clone(), self.kernel, self.stride, self.padding, epilogue)
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
        kernels::group_norm(x, self.weight.clone(), self.bias.clone(), self.num_groups, self.eps, false)
    }

    /// `silu(self.forward(x))` in one pass.
    pub fn forward_silu(&self, x: Tensor<4>) -> Tensor<4> {
        kernels::group_norm(x, self.weight.clone(), self.bias.clone(), self.num_groups, self.eps, true)
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
        kernels::layer_norm(x, self.weight.clone(), self.bias.clone(), self.eps)
    }
}

/// The activations diffusers' configs name (`act_fn`, `timestep_post_act`) that its UNets use.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    Silu,
    /// PyTorch's exact (erf) GELU.
    Gelu,
}

impl Activation {
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "silu" | "swish" => Ok(Self::Silu),
            "gelu" => Ok(Self::Gelu),
            other => Err(Error::Invalid(format!("unsupported activation {other} (silu and gelu are)"))),
        }
    }

    pub fn apply<const D: usize>(self, x: Tensor<D>) -> Tensor<D> {
        match self {
            Self::Silu => silu(x),
            Self::Gelu => gelu(x),
        }
    }
}
