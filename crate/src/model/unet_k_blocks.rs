//! The K-diffusion UNet's blocks (diffusers' `KDownBlock2D`, `KCrossAttnDownBlock2D`,
//! `KUpBlock2D`, `KCrossAttnUpBlock2D` and `KAttentionBlock`), which the latent x2 upscaler is
//! built of: resnets whose group norms take their scale and shift from the time embedding,
//! attention without a feed-forward, and fixed-kernel resampling. The plain and cross-attention
//! kinds differ only in the attentions, so one type serves both; weight names are diffusers'.
use burn::tensor::Tensor;

use super::attention::Attention;
use super::normalization::AdaGroupNorm;
use super::resnet::{CondNormConfig, ResnetBlockCondNorm2D, k_downsample, k_upsample};
use crate::error::{Error, Result};
use crate::weights::Weights;

/// Channels per group of every group norm in these blocks (diffusers' `resnet_group_size`).
pub const GROUP_SIZE: usize = 32;

/// What a cross-attention kind's attentions are sized by.
pub struct KAttentionConfig {
    pub head_dim: usize,
    pub context_dim: usize,
}

/// Self-attention (in some blocks) then cross-attention on the text, each after its own
/// time-conditioned group norm and added back to its input.
pub struct KAttentionBlock {
    pub norm1: Option<AdaGroupNorm>,
    pub attn1: Option<Attention>,
    pub norm2: AdaGroupNorm,
    pub attn2: Attention,
}

impl KAttentionBlock {
    fn load(w: &Weights, dim: usize, attention: &KAttentionConfig, self_attention: bool, cfg: &CondNormConfig) -> Result<Self> {
        if dim % attention.head_dim != 0 {
            return Err(Error::Invalid(format!("{dim} channels do not split into heads of attention_head_dim {}", attention.head_dim)));
        }
        let heads = dim / attention.head_dim;
        let groups = (dim / cfg.group_size).max(1);
        let norm = |name: &str| AdaGroupNorm::load(&w.pp(name), cfg.temb_channels, dim, groups, 1e-5);
        let (norm1, attn1) = if self_attention {
            (Some(norm("norm1")?), Some(Attention::load_k(&w.pp("attn1"), dim, None, heads, attention.head_dim)?))
        } else {
            (None, None)
        };
        Ok(Self { norm1, attn1, norm2: norm("norm2")?, attn2: Attention::load_k(&w.pp("attn2"), dim, Some(attention.context_dim), heads, attention.head_dim)? })
    }

    fn forward(&self, mut x: Tensor<4>, temb: &Tensor<2>, context: &Tensor<3>) -> Tensor<4> {
        if let (Some(norm), Some(attn)) = (&self.norm1, &self.attn1) {
            x = attend(attn, norm.forward(x.clone(), temb), None) + x;
        }
        attend(&self.attn2, self.norm2.forward(x.clone(), temb), Some(context.clone())) + x
    }
}

/// `attn` over the pixels of `x` `[B, C, H, W]` as tokens, back in `x`'s layout.
fn attend(attn: &Attention, x: Tensor<4>, context: Option<Tensor<3>>) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    let tokens = x.reshape([b, c, h * w]).swap_dims(1, 2);
    attn.forward(tokens, context, None).swap_dims(1, 2).reshape([b, c, h, w])
}

/// Layer `j` of a block: its resnet, then its attention where the block has them.
fn layer(resnets: &[ResnetBlockCondNorm2D], attentions: &[KAttentionBlock], j: usize, x: Tensor<4>, temb: &Tensor<2>, context: &Tensor<3>) -> Tensor<4> {
    let x = resnets[j].forward(x, temb);
    match attentions.get(j) {
        Some(attention) => attention.forward(x, temb, context),
        None => x,
    }
}

fn load_resnet(w: &Weights, j: usize, c_in: usize, c_mid: usize, c_out: usize, cfg: &CondNormConfig) -> Result<ResnetBlockCondNorm2D> {
    ResnetBlockCondNorm2D::load(&w.pp("resnets").pp(j), c_in, c_mid, c_out, cfg)
}

fn load_attention(w: &Weights, j: usize, dim: usize, attention: &Option<KAttentionConfig>, self_attention: bool, cfg: &CondNormConfig) -> Result<Option<KAttentionBlock>> {
    match attention {
        Some(a) => Ok(Some(KAttentionBlock::load(&w.pp("attentions").pp(j), dim, a, self_attention, cfg)?)),
        None => Ok(None),
    }
}

pub struct KDownBlock2D {
    pub resnets: Vec<ResnetBlockCondNorm2D>,
    pub attentions: Vec<KAttentionBlock>,
    downsample: bool,
}

impl KDownBlock2D {
    /// `attention` makes it the cross-attention kind, whose deepest block (no downsampler) also
    /// self-attends.
    pub fn load(w: &Weights, c_in: usize, c_out: usize, num_layers: usize, downsample: bool, attention: Option<KAttentionConfig>, cfg: &CondNormConfig) -> Result<Self> {
        let mut resnets = Vec::with_capacity(num_layers);
        let mut attentions = Vec::new();
        for j in 0..num_layers {
            resnets.push(load_resnet(w, j, if j == 0 { c_in } else { c_out }, c_out, c_out, cfg)?);
            attentions.extend(load_attention(w, j, c_out, &attention, !downsample, cfg)?);
        }
        Ok(Self { resnets, attentions, downsample })
    }

    /// Pushes a skip per resnet for the up path: its output, or `None` where diffusers passes
    /// none (the cross-attention kind without a downsampler).
    pub fn forward(&self, mut x: Tensor<4>, temb: &Tensor<2>, context: &Tensor<3>, skips: &mut Vec<Option<Tensor<4>>>) -> Tensor<4> {
        for j in 0..self.resnets.len() {
            x = layer(&self.resnets, &self.attentions, j, x, temb, context);
            let passes_skip = self.attentions.is_empty() || self.downsample;
            skips.push(passes_skip.then(|| x.clone()));
        }
        if self.downsample { k_downsample(x) } else { x }
    }
}

pub struct KUpBlock2D {
    pub resnets: Vec<ResnetBlockCondNorm2D>,
    pub attentions: Vec<KAttentionBlock>,
    upsample: bool,
}

impl KUpBlock2D {
    /// diffusers' channel plan: the block narrows from its `c_out` to its `c_in` in its last
    /// resnet. A cross-attention block whose `c_in`, `c_out` and `temb_channels` are all equal
    /// is the first (it self-attends and gets no skip); one whose `c_in` and `c_out` differ
    /// narrows in its last conv and attends at the narrower width.
    pub fn load(w: &Weights, c_in: usize, c_out: usize, num_layers: usize, upsample: bool, attention: Option<KAttentionConfig>, cfg: &CondNormConfig) -> Result<Self> {
        let first = attention.is_some() && c_in == c_out && c_out == cfg.temb_channels;
        let k_in = if first { c_out } else { 2 * c_out };
        let layers = num_layers - 1;
        let mut resnets = Vec::with_capacity(layers);
        let mut attentions = Vec::new();
        for j in 0..layers {
            let last = j + 1 == layers;
            let r_in = if j == 0 { k_in } else { c_out };
            let width = if last { c_in } else { c_out };
            // The cross-attention kind keeps conv1 at c_out; the plain one narrows both convs.
            let c_mid = if attention.is_some() { c_out } else { width };
            resnets.push(load_resnet(w, j, r_in, c_mid, width, cfg)?);
            attentions.extend(load_attention(w, j, width, &attention, first, cfg)?);
        }
        Ok(Self { resnets, attentions, upsample })
    }

    /// Takes this block's share of the skips (one per resnet) and concatenates the last pushed.
    pub fn forward(&self, mut x: Tensor<4>, temb: &Tensor<2>, context: &Tensor<3>, skips: &mut Vec<Option<Tensor<4>>>) -> Tensor<4> {
        let share = skips.split_off(skips.len() - self.resnets.len());
        if let Some(Some(skip)) = share.last() {
            x = Tensor::cat(vec![x, skip.clone()], 1);
        }
        for j in 0..self.resnets.len() {
            x = layer(&self.resnets, &self.attentions, j, x, temb, context);
        }
        if self.upsample { k_upsample(x) } else { x }
    }
}
