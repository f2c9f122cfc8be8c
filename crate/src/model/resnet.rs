//! diffusers' `ResnetBlock2D`, `ResnetBlockCondNorm2D`, and the down- and upsamplers that go with
//! them (`Downsample2D`, `Upsample2D`, and the K-diffusion UNet's fixed-kernel `KDownsample2D`
//! and `KUpsample2D`).
use burn::tensor::Tensor;
use burn::tensor::activation::silu;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};

use super::nn::{Activation, Conv2d, GroupNorm, Linear};
use super::normalization::AdaGroupNorm;
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

/// The K-diffusion UNet's resnet (`time_embedding_norm = "ada_group"`): both norms take their
/// scale and shift from the time embedding, and the shortcut conv has no bias.
pub struct ResnetBlockCondNorm2D {
    pub norm1: AdaGroupNorm,
    pub conv1: Conv2d,
    pub norm2: AdaGroupNorm,
    pub conv2: Conv2d,
    pub conv_shortcut: Option<Conv2d>,
    act: Activation,
}

/// The K blocks' resnet settings: groups of `group_size` channels each.
pub struct CondNormConfig {
    pub temb_channels: usize,
    pub group_size: usize,
    pub eps: f64,
    pub act: Activation,
}

impl ResnetBlockCondNorm2D {
    /// `c_in` → `c_mid` (conv1, norm2) → `c_out` (conv2; diffusers' `conv_2d_out_channels`).
    pub fn load(w: &Weights, c_in: usize, c_mid: usize, c_out: usize, cfg: &CondNormConfig) -> Result<Self> {
        let conv_shortcut = if c_in != c_out { Some(Conv2d::load_unbiased(&w.pp("conv_shortcut"), c_in, c_out, 1, 0)?) } else { None };
        Ok(Self {
            norm1: AdaGroupNorm::load(&w.pp("norm1"), cfg.temb_channels, c_in, c_in / cfg.group_size, cfg.eps)?,
            conv1: Conv2d::load(&w.pp("conv1"), c_in, c_mid, 3, 1, 1)?,
            norm2: AdaGroupNorm::load(&w.pp("norm2"), cfg.temb_channels, c_mid, c_mid / cfg.group_size, cfg.eps)?,
            conv2: Conv2d::load(&w.pp("conv2"), c_mid, c_out, 3, 1, 1)?,
            conv_shortcut,
            act: cfg.act,
        })
    }

    pub fn forward(&self, x: Tensor<4>, temb: &Tensor<2>) -> Tensor<4> {
        let h = self.conv1.forward(self.act.apply(self.norm1.forward(x.clone(), temb)));
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x),
            None => x,
        };
        self.conv2.forward_with(self.act.apply(self.norm2.forward(h, temb)), Conv2dEpilogue { channel_add: None, residual: Some(shortcut) })
    }
}

/// Halves height and width with the fixed separable kernel `[1, 3, 3, 1] / 8` at stride 2 on
/// the reflect-padded input, per channel.
pub fn k_downsample(x: Tensor<4>) -> Tensor<4> {
    blur_down(blur_down(x, 3), 2)
}

/// Doubles height and width as the transposed convolution with kernel `[1, 3, 3, 1] / 4` does:
/// each new sample is ¾ of its nearest input and ¼ of the next nearest (edges reflected).
pub fn k_upsample(x: Tensor<4>) -> Tensor<4> {
    blur_up(blur_up(x, 3), 2)
}

/// `x` reflect-padded by one sample at both ends of `axis`.
fn reflect_pad(x: Tensor<4>, axis: usize) -> Tensor<4> {
    let n = x.dims()[axis];
    Tensor::cat(vec![x.clone().narrow(axis, 1, 1), x.clone(), x.narrow(axis, n - 2, 1)], axis)
}

/// `x`'s dims with `axis` split into `(len / 2, 2)`.
fn pairs(x: Tensor<4>, axis: usize) -> Tensor<5> {
    let d = x.dims();
    let mut shape = [0; 5];
    shape[..axis].copy_from_slice(&d[..axis]);
    shape[axis] = d[axis] / 2;
    shape[axis + 1] = 2;
    shape[axis + 2..].copy_from_slice(&d[axis + 1..]);
    x.reshape(shape)
}

/// Element `which` of each pair along `axis` (see [`pairs`]).
fn pick(x: &Tensor<5>, axis: usize, which: usize) -> Tensor<4> {
    let mut d = x.dims().to_vec();
    d.remove(axis + 1);
    x.clone().narrow(axis + 1, which, 1).reshape([d[0], d[1], d[2], d[3]])
}

/// One axis of [`k_downsample`]: `y[m] = (x[2m-1] + 3x[2m] + 3x[2m+1] + x[2m+2]) / 8`.
fn blur_down(x: Tensor<4>, axis: usize) -> Tensor<4> {
    let n = x.dims()[axis];
    let padded = reflect_pad(x, axis);
    let (front, back) = (pairs(padded.clone().narrow(axis, 0, n), axis), pairs(padded.narrow(axis, 2, n), axis));
    let inner = pick(&front, axis, 1) + pick(&back, axis, 0);
    (pick(&front, axis, 0) + pick(&back, axis, 1) + inner.mul_scalar(3.0)).div_scalar(8.0)
}

/// One axis of [`k_upsample`]: `y[2m] = ¼x[m-1] + ¾x[m]`, `y[2m+1] = ¾x[m] + ¼x[m+1]`.
fn blur_up(x: Tensor<4>, axis: usize) -> Tensor<4> {
    let n = x.dims()[axis];
    let padded = reflect_pad(x, axis);
    let at = |start: usize| padded.clone().narrow(axis, start, n);
    let centre = at(1).mul_scalar(0.75);
    let even = at(0).mul_scalar(0.25) + centre.clone();
    let odd = centre + at(2).mul_scalar(0.25);
    let mut shape = even.dims();
    shape[axis] *= 2;
    Tensor::cat(vec![even.unsqueeze_dim::<5>(axis + 1), odd.unsqueeze_dim::<5>(axis + 1)], axis + 1).reshape(shape)
}
