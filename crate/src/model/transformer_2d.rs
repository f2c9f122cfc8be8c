//! diffusers' `Transformer2DModel` for continuous (image) input.
use burn::tensor::Tensor;

use super::attention::BasicTransformerBlock;
use super::nn::{Conv2d, GroupNorm, Linear};
use crate::error::Result;
use crate::kernels::Conv2dEpilogue;
use crate::weights::Weights;

/// SD 1.x projects in and out with 1x1 convs, SD 2.x with linears (`use_linear_projection`).
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

pub struct Transformer2DConfig {
    pub heads: usize,
    pub head_dim: usize,
    pub num_layers: usize,
    pub context_dim: usize,
    pub norm_num_groups: usize,
    pub use_linear_projection: bool,
    pub only_cross_attention: bool,
}

impl Transformer2DModel {
    pub fn load(w: &Weights, channels: usize, cfg: &Transformer2DConfig) -> Result<Self> {
        let inner = cfg.heads * cfg.head_dim;
        let projection = |name: &str, d_in: usize, d_out: usize| -> Result<Projection> {
            Ok(if cfg.use_linear_projection {
                Projection::Linear(Linear::load(&w.pp(name), d_in, d_out, true)?)
            } else {
                Projection::Conv(Conv2d::load(&w.pp(name), d_in, d_out, 1, 1, 0)?)
            })
        };
        let transformer_blocks = (0..cfg.num_layers)
            .map(|i| BasicTransformerBlock::load(&w.pp("transformer_blocks").pp(i), inner, cfg.heads, cfg.head_dim, cfg.context_dim, cfg.only_cross_attention))
            .collect::<Result<_>>()?;
        Ok(Self {
            norm: GroupNorm::load(&w.pp("norm"), cfg.norm_num_groups, channels, 1e-6)?,
            proj_in: projection("proj_in", channels, inner)?,
            transformer_blocks,
            proj_out: projection("proj_out", inner, channels)?,
        })
    }

    pub fn forward(&self, x: Tensor<4>, context: Tensor<3>) -> Tensor<4> {
        let [b, _, h, w] = x.dims();
        let to_tokens = |t: Tensor<4>| {
            let ch = t.dims()[1];
            t.reshape([b, ch, h * w]).swap_dims(1, 2)
        };
        let to_image = |t: Tensor<3>| {
            let ch = t.dims()[2];
            t.swap_dims(1, 2).reshape([b, ch, h, w])
        };
        let normed = self.norm.forward(x.clone());
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(conv.forward(normed)),
            Projection::Linear(linear) => linear.forward(to_tokens(normed)),
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(tokens, context.clone());
        }
        match &self.proj_out {
            Projection::Conv(conv) => conv.forward_with(to_image(tokens), Conv2dEpilogue { channel_add: None, residual: Some(x) }),
            Projection::Linear(linear) => to_image(linear.forward(tokens)) + x,
        }
    }
}
