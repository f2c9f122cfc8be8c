//! diffusers' `ResnetBlock2D`, `Downsample2D` and `Upsample2D`.
use burn::tensor::Tensor;
use burn::tensor::activation::silu;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};

use super::nn::{Conv2d, GroupNorm, Linear};
use crate::kernels::Conv2dEpilogue;
use crate::error::Result;
use crate::weights::Weights;

/// Two norm-SiLU-conv stages with an optional time-embedding shift and a (1x1) shortcut.
pub struct ResnetBlock2D {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub time_emb_proj: Option<Linear>,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

pub struct ResnetConfig {
    pub groups: usize,
    pub eps: f64,
    /// Width of the time embedding; `None` in the VAE.
    pub temb_channels: Option<usize>,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn load(w: &Weights, c_in: usize, c_out: usize, cfg: &ResnetConfig) -> Result<Self> {
        let time_emb_proj = match cfg.temb_channels {
            Some(t) => Some(Linear::load(&w.pp("time_emb_proj"), t, c_out, true)?),
            None => None,
        };
        let conv_shortcut =
            if c_in != c_out { Some(Conv2d::load(&w.pp("conv_shortcut"), c_in, c_out, 1, 1, 0)?) } else { None };
        Ok(Self {
            norm1: GroupNorm::load(&w.pp("norm1"), cfg.groups, c_in, cfg.eps)?,
            conv1: Conv2d::load(&w.pp("conv1"), c_in, c_out, 3, 1, 1)?,
            time_emb_proj,
            norm2: GroupNorm::load(&w.pp("norm2"), cfg.groups, c_out, cfg.eps)?,
            conv2: Conv2d::load(&w.pp("conv2"), c_out, c_out, 3, 1, 1)?,
            conv_shortcut,
            output_scale_factor: cfg.output_scale_factor,
        })
    }

    /// `temb` is the UNet's time embedding `[B, T]` (before SiLU), `None` in the VAE. The time
    /// shift and the shortcut are added by the convolutions as they write.
    pub fn forward(&self, x: Tensor<4>, temb: Option<&Tensor<2>>) -> Tensor<4> {
        let channel_add = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => Some(proj.forward(silu(temb.clone()))),
            _ => None,
        };
        let h = self.conv1.forward_with(self.norm1.forward_silu(x.clone()), Conv2dEpilogue { channel_add, residual: None });
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x),
            None => x,
        };
        let out = self.conv2.forward_with(self.norm2.forward_silu(h), Conv2dEpilogue { channel_add: None, residual: Some(shortcut) });
        if self.output_scale_factor == 1.0 { out } else { out / self.output_scale_factor }
    }
}

/// Stride-2 3x3 conv. The UNet pads 1 on every side; the VAE encoder (`padding=0`)
/// pads only right and bottom, as diffusers does.
pub struct Downsample2D {
    pub conv: Conv2d,
}

impl Downsample2D {
    pub fn load(w: &Weights, channels: usize, padding: usize) -> Result<Self> {
        let pad = if padding == 0 { (0, 1) } else { (padding, padding) };
        Ok(Self { conv: Conv2d::load_padded(&w.pp("conv"), channels, channels, 3, 2, pad)? })
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.conv.forward(x)
    }
}

/// Nearest-neighbour 2x upsampling followed by a 3x3 conv.
pub struct Upsample2D {
    pub conv: Conv2d,
}

impl Upsample2D {
    pub fn load(w: &Weights, channels: usize) -> Result<Self> {
        Ok(Self { conv: Conv2d::load(&w.pp("conv"), channels, channels, 3, 1, 1)? })
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [_, _, h, w] = x.dims();
        let up = interpolate(x, InterpolateOptions::new(InterpolateMode::Nearest).with_output_size([h * 2, w * 2]));
        self.conv.forward(up)
    }
}
