//! diffusers' `Attention`, `FeedForward` (GEGLU) and `BasicTransformerBlock`.
use burn::tensor::Tensor;

use super::nn::{GroupNorm, LayerNorm, Linear};
use crate::error::Result;
use crate::kernels::{self, LinearEpilogue};
use crate::weights::Weights;

/// `Attention`: q from the input, k/v from `context` (cross-attention) or the input itself.
/// With `group_norm` set it is the VAE's spatial self-attention with a residual connection.
pub struct Attention {
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
    pub group_norm: Option<GroupNorm>,
    /// A layer norm on the context before k/v (`cross_attention_norm = "layer_norm"`).
    pub norm_cross: Option<LayerNorm>,
    heads: usize,
}

impl Attention {
    /// The UNet's attention: q/k/v without bias, output projection `to_out.0` with bias.
    pub fn load(w: &Weights, query_dim: usize, context_dim: usize, heads: usize, head_dim: usize) -> Result<Self> {
        Self::load_projections(w, query_dim, context_dim, heads, head_dim, false, None)
    }

    /// The K-diffusion UNet's attention (`KAttentionBlock`): q/k/v with bias, and for
    /// cross-attention (`context_dim`) the context layer-normed first.
    pub fn load_k(w: &Weights, query_dim: usize, context_dim: Option<usize>, heads: usize, head_dim: usize) -> Result<Self> {
        let norm_cross = match context_dim {
            Some(dim) => Some(LayerNorm::load(&w.pp("norm_cross"), dim, 1e-5)?),
            None => None,
        };
        Self::load_projections(w, query_dim, context_dim.unwrap_or(query_dim), heads, head_dim, true, norm_cross)
    }

    fn load_projections(w: &Weights, query_dim: usize, context_dim: usize, heads: usize, head_dim: usize, qkv_bias: bool, norm_cross: Option<LayerNorm>) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: Linear::load(&w.pp("to_q"), query_dim, inner, qkv_bias)?,
            to_k: Linear::load(&w.pp("to_k"), context_dim, inner, qkv_bias)?,
            to_v: Linear::load(&w.pp("to_v"), context_dim, inner, qkv_bias)?,
            to_out: Linear::load(&w.pp("to_out.0"), inner, query_dim, true)?,
            group_norm: None,
            norm_cross,
            heads,
        })
    }

    /// The VAE mid-block's single-head attention. Older checkpoints name the projections
    /// `query`/`key`/`value`/`proj_attn`; diffusers renames them on load, so do we.
    pub fn load_vae(w: &Weights, channels: usize, num_groups: usize, eps: f64) -> Result<Self> {
        let legacy = w.contains("query.weight");
        let name = |new: &'static str, old: &'static str| if legacy { old } else { new };
        Ok(Self {
            to_q: Linear::load(&w.pp(name("to_q", "query")), channels, channels, true)?,
            to_k: Linear::load(&w.pp(name("to_k", "key")), channels, channels, true)?,
            to_v: Linear::load(&w.pp(name("to_v", "value")), channels, channels, true)?,
            to_out: Linear::load(&w.pp(name("to_out.0", "proj_attn")), channels, channels, true)?,
            group_norm: Some(GroupNorm::load(&w.pp("group_norm"), num_groups, channels, eps)?),
            norm_cross: None,
            heads: 1,
        })
    }

    /// `x`: `[B, N, C]`; `context`: `[B, M, C_ctx]` for cross-attention; `residual` (shaped
    /// like the output) is added by the output projection.
    pub fn forward(&self, x: Tensor<3>, context: Option<Tensor<3>>, residual: Option<Tensor<3>>) -> Tensor<3> {
        let context = match (context, &self.norm_cross) {
            (Some(context), Some(norm)) => norm.forward(context),
            (context, _) => context.unwrap_or_else(|| x.clone()),
        };
        let q = self.to_q.forward(x);
        let k = self.to_k.forward(context.clone());
        let v = self.to_v.forward(context);
        self.to_out.forward_with(kernels::attention(q, k, v, self.heads, false), LinearEpilogue { residual, geglu: false })
    }

    /// Spatial self-attention over `[B, C, H, W]` with the residual added back.
    pub fn forward_spatial(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let normed = match &self.group_norm {
            Some(norm) => norm.forward(x.clone()),
            None => x.clone(),
        };
        let tokens = normed.reshape([b, c, h * w]).swap_dims(1, 2);
        let out = self.forward(tokens, None, None).swap_dims(1, 2).reshape([b, c, h, w]);
        out + x
    }
}

/// `FeedForward` with GEGLU: `net.0.proj` doubles the width, half gates the other through GELU.
pub struct FeedForward {
    pub proj_in: Linear,
    pub proj_out: Linear,
}

impl FeedForward {
    pub fn load(w: &Weights, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj_in: Linear::load(&w.pp("net.0.proj"), dim, inner * 2, true)?,
            proj_out: Linear::load(&w.pp("net.2"), inner, dim, true)?,
        })
    }

    /// The GELU gating runs in the first projection's pass; `residual` is added by the second.
    pub fn forward(&self, x: Tensor<3>, residual: Tensor<3>) -> Tensor<3> {
        let hidden = self.proj_in.forward_with(x, LinearEpilogue { residual: None, geglu: true });
        self.proj_out.forward_with(hidden, LinearEpilogue { residual: Some(residual), geglu: false })
    }
}

/// `BasicTransformerBlock`: self-attention, cross-attention on the text, feed-forward; each pre-normed and residual.
/// With `only_cross_attention` the first attention attends to the text too (the x4 upscaler).
pub struct BasicTransformerBlock {
    pub norm1: LayerNorm,
    pub attn1: Attention,
    pub norm2: LayerNorm,
    pub attn2: Attention,
    pub norm3: LayerNorm,
    pub ff: FeedForward,
    only_cross_attention: bool,
}

impl BasicTransformerBlock {
    pub fn load(w: &Weights, dim: usize, heads: usize, head_dim: usize, context_dim: usize, only_cross_attention: bool) -> Result<Self> {
        let attn1_context = if only_cross_attention { context_dim } else { dim };
        Ok(Self {
            norm1: LayerNorm::load(&w.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::load(&w.pp("attn1"), dim, attn1_context, heads, head_dim)?,
            norm2: LayerNorm::load(&w.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::load(&w.pp("attn2"), dim, context_dim, heads, head_dim)?,
            norm3: LayerNorm::load(&w.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::load(&w.pp("ff"), dim)?,
            only_cross_attention,
        })
    }

    pub fn forward(&self, x: Tensor<3>, context: Tensor<3>) -> Tensor<3> {
        let attn1_context = self.only_cross_attention.then(|| context.clone());
        let x = self.attn1.forward(self.norm1.forward(x.clone()), attn1_context, Some(x));
        let x = self.attn2.forward(self.norm2.forward(x.clone()), Some(context), Some(x));
        self.ff.forward(self.norm3.forward(x.clone()), x)
    }
}
