//! The UNet's down, mid and up blocks. `CrossAttnDownBlock2D` and `DownBlock2D` differ
//! only in whether a `Transformer2DModel` follows each resnet, so one type serves both
//! (likewise for the up blocks); weight names are diffusers' (`resnets.N`, `attentions.N`,
//! `downsamplers.0`, `upsamplers.0`).
use burn::tensor::Tensor;

use super::resnet::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};
use super::transformer_2d::{Transformer2DConfig, Transformer2DModel};
use crate::error::Result;
use crate::weights::Weights;

/// Per-block settings the UNet derives from its config.
pub struct BlockConfig {
    pub resnet: ResnetConfig,
    /// `Some` for the cross-attention variants.
    pub transformer: Option<Transformer2DConfig>,
}

fn load_attentions(w: &Weights, count: usize, channels: usize, cfg: &BlockConfig) -> Result<Vec<Transformer2DModel>> {
    match &cfg.transformer {
        Some(t) => (0..count).map(|j| Transformer2DModel::load(&w.pp("attentions").pp(j), channels, t)).collect(),
        None => Ok(Vec::new()),
    }
}

pub struct DownBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub downsampler: Option<Downsample2D>,
}

impl DownBlock2D {
    pub fn load(w: &Weights, c_in: usize, c_out: usize, num_layers: usize, downsample_padding: Option<usize>, cfg: &BlockConfig) -> Result<Self> {
        let resnets = (0..num_layers)
            .map(|j| ResnetBlock2D::load(&w.pp("resnets").pp(j), if j == 0 { c_in } else { c_out }, c_out, &cfg.resnet))
            .collect::<Result<_>>()?;
        let downsampler = match downsample_padding {
            Some(padding) => Some(Downsample2D::load(&w.pp("downsamplers.0"), c_out, padding)?),
            None => None,
        };
        Ok(Self { resnets, attentions: load_attentions(w, num_layers, c_out, cfg)?, downsampler })
    }

    /// Pushes every intermediate state onto `skips` for the up path.
    pub fn forward(&self, mut x: Tensor<4>, temb: &Tensor<2>, context: &Tensor<3>, skips: &mut Vec<Tensor<4>>) -> Tensor<4> {
        for (j, resnet) in self.resnets.iter().enumerate() {
            x = resnet.forward(x, Some(temb));
            if let Some(attention) = self.attentions.get(j) {
                x = attention.forward(x, context.clone());
            }
            skips.push(x.clone());
        }
        if let Some(down) = &self.downsampler {
            x = down.forward(x);
            skips.push(x.clone());
        }
        x
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) pairs.
pub struct MidBlock2DCrossAttn {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
}

impl MidBlock2DCrossAttn {
    pub fn load(w: &Weights, channels: usize, cfg: &BlockConfig) -> Result<Self> {
        let resnets = (0..2).map(|j| ResnetBlock2D::load(&w.pp("resnets").pp(j), channels, channels, &cfg.resnet)).collect::<Result<_>>()?;
        Ok(Self { resnets, attentions: load_attentions(w, 1, channels, cfg)? })
    }

    pub fn forward(&self, x: Tensor<4>, temb: &Tensor<2>, context: &Tensor<3>) -> Tensor<4> {
        let mut x = self.resnets[0].forward(x, Some(temb));
        for (attention, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            x = resnet.forward(attention.forward(x, context.clone()), Some(temb));
        }
        x
    }
}

pub struct UpBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub upsampler: Option<Upsample2D>,
}

pub struct UpChannels {
    /// Channels of the skip from the matching down block's input.
    pub c_in: usize,
    pub c_out: usize,
    /// Channels coming up from the previous (deeper) block.
    pub c_prev: usize,
}

impl UpBlock2D {
    pub fn load(w: &Weights, ch: &UpChannels, num_layers: usize, add_upsample: bool, cfg: &BlockConfig) -> Result<Self> {
        let resnets = (0..num_layers)
            .map(|j| {
                let skip = if j == num_layers - 1 { ch.c_in } else { ch.c_out };
                let from_below = if j == 0 { ch.c_prev } else { ch.c_out };
                ResnetBlock2D::load(&w.pp("resnets").pp(j), from_below + skip, ch.c_out, &cfg.resnet)
            })
            .collect::<Result<_>>()?;
        let upsampler = if add_upsample { Some(Upsample2D::load(&w.pp("upsamplers.0"), ch.c_out)?) } else { None };
        Ok(Self { resnets, attentions: load_attentions(w, num_layers, ch.c_out, cfg)?, upsampler })
    }

    /// Pops one skip per resnet, concatenated on channels.
    pub fn forward(&self, mut x: Tensor<4>, temb: &Tensor<2>, context: &Tensor<3>, skips: &mut Vec<Tensor<4>>) -> Tensor<4> {
        for (j, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().expect("down path pushed one skip per up resnet");
            x = resnet.forward(Tensor::cat(vec![x, skip], 1), Some(temb));
            if let Some(attention) = self.attentions.get(j) {
                x = attention.forward(x, context.clone());
            }
        }
        match &self.upsampler {
            Some(up) => up.forward(x),
            None => x,
        }
    }
}
