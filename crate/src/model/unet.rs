//! diffusers' `UNet2DConditionModel` as SD 1.x / 2.x / Turbo, SDXL, the inpainting checkpoints
//! and the x4 upscaler use it, sized entirely by `unet/config.json`.
use burn::tensor::Tensor;
use serde::Deserialize;

use super::config::PerBlock;
use super::embeddings::{TimestepEmbedding, timestep_embedding};
use super::nn::{Conv2d, GroupNorm};
use super::resnet::ResnetConfig;
use super::transformer_2d::Transformer2DConfig;
use super::unet_blocks::{BlockConfig, DownBlock2D, MidBlock2DCrossAttn, UpBlock2D, UpChannels};
use crate::error::{Error, Result};
use crate::weights::Weights;

#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub sample_size: Option<usize>,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: PerBlock<usize>,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub act_fn: String,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub cross_attention_dim: PerBlock<usize>,
    pub transformer_layers_per_block: PerBlock<usize>,
    /// For SD 1.x/2.x this is, confusingly, the number of heads (diffusers keeps the name for compatibility).
    pub attention_head_dim: PerBlock<usize>,
    pub num_attention_heads: Option<PerBlock<usize>>,
    pub use_linear_projection: bool,
    /// The engine computes attention in f32 throughout, so upcasting is always satisfied.
    pub upcast_attention: bool,
    /// Blocks whose first attention also attends to the text instead of the image (the x4 upscaler).
    pub only_cross_attention: PerBlock<bool>,
    pub dual_cross_attention: bool,
    pub class_embed_type: Option<String>,
    /// Size of the class-label table added to the time embedding (the x4 upscaler's noise level).
    pub num_class_embeds: Option<usize>,
    pub class_embeddings_concat: bool,
    /// `text_time` (SDXL): the pooled text embedding and the time ids join the time embedding.
    pub addition_embed_type: Option<String>,
    /// Channels of each time id's sinusoidal embedding.
    pub addition_time_embed_dim: Option<usize>,
    /// Width of `add_embedding`'s input: the pooled embedding's plus 6 time ids' embeddings.
    pub projection_class_embeddings_input_dim: Option<usize>,
    pub encoder_hid_dim: Option<usize>,
    pub time_cond_proj_dim: Option<usize>,
    pub resnet_time_scale_shift: String,
    pub time_embedding_type: String,
    /// Width of the time embedding; diffusers defaults to 4 × the first block's channels.
    pub time_embedding_dim: Option<usize>,
    pub time_embedding_act_fn: Option<String>,
    pub timestep_post_act: Option<String>,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    pub attention_type: String,
}

impl Default for UNetConfig {
    /// diffusers' defaults for every field a config may omit.
    fn default() -> Self {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect();
        Self {
            in_channels: 4,
            out_channels: 4,
            sample_size: None,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: s(&["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            up_block_types: s(&["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerBlock::One(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            act_fn: "silu".into(),
            norm_num_groups: 32,
            norm_eps: 1e-5,
            cross_attention_dim: PerBlock::One(1280),
            transformer_layers_per_block: PerBlock::One(1),
            attention_head_dim: PerBlock::One(8),
            num_attention_heads: None,
            use_linear_projection: false,
            upcast_attention: false,
            only_cross_attention: PerBlock::One(false),
            dual_cross_attention: false,
            class_embed_type: None,
            num_class_embeds: None,
            class_embeddings_concat: false,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            projection_class_embeddings_input_dim: None,
            encoder_hid_dim: None,
            time_cond_proj_dim: None,
            resnet_time_scale_shift: "default".into(),
            time_embedding_type: "positional".into(),
            time_embedding_dim: None,
            time_embedding_act_fn: None,
            timestep_post_act: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            attention_type: "default".into(),
        }
    }
}

/// The config, resolved to one value per block.
struct Resolved {
    heads: Vec<usize>,
    layers: Vec<usize>,
    transformer_layers: Vec<usize>,
    cross_dims: Vec<usize>,
    only_cross: Vec<bool>,
}

impl UNetConfig {
    /// Rejects what this engine does not implement, rather than computing something else.
    fn resolve(&self) -> std::result::Result<Resolved, String> {
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(format!("block_out_channels, down_block_types and up_block_types must have the same non-zero length (got {n}, {}, {})", self.down_block_types.len(), self.up_block_types.len()));
        }
        let unsupported = [
            (self.act_fn != "silu", format!("act_fn={}", self.act_fn)),
            (self.dual_cross_attention, "dual_cross_attention".into()),
            (self.class_embed_type.is_some(), format!("class_embed_type={:?} (only a num_class_embeds table is implemented)", self.class_embed_type)),
            (self.class_embeddings_concat, "class_embeddings_concat".into()),
            (self.addition_embed_type.as_deref().is_some_and(|t| t != "text_time"), format!("addition_embed_type={:?} (text_time is implemented)", self.addition_embed_type)),
            (self.encoder_hid_dim.is_some(), "encoder_hid_dim".into()),
            (self.time_cond_proj_dim.is_some(), "time_cond_proj_dim (guidance-embedded LCM UNets)".into()),
            (self.resnet_time_scale_shift != "default", format!("resnet_time_scale_shift={}", self.resnet_time_scale_shift)),
            (self.time_embedding_type != "positional", format!("time_embedding_type={}", self.time_embedding_type)),
            (self.time_embedding_act_fn.is_some() || self.timestep_post_act.is_some(), "extra time-embedding activations".into()),
            (self.conv_in_kernel != 3 || self.conv_out_kernel != 3, "conv kernels other than 3".into()),
            (self.attention_type != "default", format!("attention_type={}", self.attention_type)),
            (self.mid_block_type.as_deref() != Some("UNetMidBlock2DCrossAttn"), format!("mid_block_type={:?}", self.mid_block_type)),
        ];
        if let Some((_, what)) = unsupported.into_iter().find(|(bad, _)| *bad) {
            return Err(format!("unsupported UNet feature: {what}"));
        }
        for t in self.down_block_types.iter().chain(&self.up_block_types) {
            if !["CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"].contains(&t.as_str()) {
                return Err(format!("unsupported block type {t}"));
            }
        }
        if self.addition_embed_type.is_some() && (self.addition_time_embed_dim.is_none() || self.projection_class_embeddings_input_dim.is_none()) {
            return Err("addition_embed_type text_time needs addition_time_embed_dim and projection_class_embeddings_input_dim".into());
        }
        let list = |name: &str, v: &PerBlock<usize>| v.expand(n).ok_or_else(|| format!("{name} must have one entry per block ({n})"));
        let heads = list("num_attention_heads", self.num_attention_heads.as_ref().unwrap_or(&self.attention_head_dim))?;
        for (i, (&h, &c)) in heads.iter().zip(&self.block_out_channels).enumerate() {
            if h == 0 || c % h != 0 || self.norm_num_groups == 0 || c % self.norm_num_groups != 0 {
                return Err(format!("block {i}: {c} channels do not split into {h} heads and {} groups", self.norm_num_groups));
            }
        }
        Ok(Resolved {
            heads,
            layers: list("layers_per_block", &self.layers_per_block)?,
            transformer_layers: list("transformer_layers_per_block", &self.transformer_layers_per_block)?,
            cross_dims: list("cross_attention_dim", &self.cross_attention_dim)?,
            only_cross: self.only_cross_attention.expand(n).ok_or_else(|| format!("only_cross_attention must have one entry per block ({n})"))?,
        })
    }

    /// Spatial down-sampling of the latent between the first and the deepest block.
    pub fn downsample_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    /// f32 bytes of the widest activation one pass makes per batch item on a `width` × `height`
    /// latent grid. At each level: the feed-forward's GEGLU output (4 × the channels) where the
    /// level has attention, and an up block's input (its channels with the deeper level's
    /// concatenated). Attention itself keeps no score matrix (`kernels::attention`).
    pub fn widest_activation_bytes(&self, width: usize, height: usize) -> u64 {
        let c = &self.block_out_channels;
        let n = c.len();
        (0..n)
            .map(|level| {
                let attention = [&self.down_block_types[level], &self.up_block_types[n - 1 - level]].iter().any(|t| t.starts_with("CrossAttn"));
                let feed_forward = if attention { 4 * c[level] } else { 0 };
                let up_input = c[level] + c.get(level + 1).copied().unwrap_or(c[level]).max(c[level]);
                let pixels = (width >> level) as u64 * (height >> level) as u64;
                4 * feed_forward.max(up_input) as u64 * pixels
            })
            .max()
            .unwrap_or(0)
    }
}

/// What a UNet call attends to: the text encoders' states `[B, L, D]`, and the pooled embedding
/// `[B, P]` of the families whose UNet also adds it to the time embedding (SDXL).
#[derive(Clone)]
pub struct TextConditioning {
    pub hidden: Tensor<3>,
    pub pooled: Option<Tensor<2>>,
}

/// What a family adds to the UNet's time embedding besides the text (diffusers' `class_labels`
/// and `added_cond_kwargs`). Used only when the UNet has the matching table; the pipelines
/// check the pairing ([`crate::pipeline::family`]).
#[derive(Clone, Copy, Debug, Default)]
pub enum AddedConditioning {
    #[default]
    None,
    /// A row of the class table: the x4 upscaler's noise level.
    ClassLabel(usize),
    /// SDXL's time ids: original size, crop corner and target size, as (height, width) pairs.
    TimeIds([f32; 6]),
}

impl AddedConditioning {
    /// The time ids of a `width` × `height` image made whole (no crop), as diffusers' SDXL
    /// pipelines pass them without an aesthetic score.
    pub fn time_ids(width: usize, height: usize) -> Self {
        let (h, w) = (height as f32, width as f32);
        Self::TimeIds([h, w, 0.0, 0.0, h, w])
    }
}

pub struct UNet2DConditionModel {
    pub config: UNetConfig,
    pub time_embedding: TimestepEmbedding,
    /// `[num_class_embeds, time embedding width]`, when the config has a class table.
    pub class_embedding: Option<Tensor<2>>,
    /// `text_time`'s MLP from the pooled embedding and the time ids' embeddings.
    pub add_embedding: Option<TimestepEmbedding>,
    pub conv_in: Conv2d,
    pub down_blocks: Vec<DownBlock2D>,
    pub mid_block: MidBlock2DCrossAttn,
    pub up_blocks: Vec<UpBlock2D>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

impl UNet2DConditionModel {
    pub fn load(w: &Weights, config: UNetConfig) -> Result<Self> {
        let r = config.resolve().map_err(Error::Invalid)?;
        let ch = &config.block_out_channels;
        let n = ch.len();
        let temb = config.time_embedding_dim.unwrap_or(ch[0] * 4);
        // The mid block never restricts itself to cross-attention (diffusers ignores
        // only_cross_attention for UNetMidBlock2DCrossAttn).
        let block_cfg = |i: usize, cross: bool, only_cross: bool, scale: f64| BlockConfig {
            resnet: ResnetConfig { groups: config.norm_num_groups, eps: config.norm_eps, temb_channels: Some(temb), output_scale_factor: scale },
            transformer: cross.then(|| Transformer2DConfig {
                heads: r.heads[i],
                head_dim: ch[i] / r.heads[i],
                num_layers: r.transformer_layers[i],
                context_dim: r.cross_dims[i],
                norm_num_groups: config.norm_num_groups,
                use_linear_projection: config.use_linear_projection,
                only_cross_attention: only_cross,
            }),
        };

        let mut down_blocks = Vec::with_capacity(n);
        for (i, kind) in config.down_block_types.iter().enumerate() {
            let c_in = if i == 0 { ch[0] } else { ch[i - 1] };
            let padding = (i + 1 < n).then_some(config.downsample_padding);
            let cfg = block_cfg(i, kind.starts_with("CrossAttn"), r.only_cross[i], 1.0);
            down_blocks.push(DownBlock2D::load(&w.pp("down_blocks").pp(i), c_in, ch[i], r.layers[i], padding, &cfg)?);
        }

        let mid_block = MidBlock2DCrossAttn::load(&w.pp("mid_block"), ch[n - 1], &block_cfg(n - 1, true, false, config.mid_block_scale_factor))?;

        // Up blocks mirror the down path: block i here pairs with down block n-1-i.
        let mut up_blocks = Vec::with_capacity(n);
        for (i, kind) in config.up_block_types.iter().enumerate() {
            let d = n - 1 - i;
            let channels = UpChannels { c_in: ch[d.saturating_sub(1)], c_out: ch[d], c_prev: if i == 0 { ch[n - 1] } else { ch[d + 1] } };
            let cfg = block_cfg(d, kind.starts_with("CrossAttn"), r.only_cross[d], 1.0);
            up_blocks.push(UpBlock2D::load(&w.pp("up_blocks").pp(i), &channels, r.layers[d] + 1, i + 1 < n, &cfg)?);
        }

        Ok(Self {
            time_embedding: TimestepEmbedding::load(&w.pp("time_embedding"), ch[0], temb)?,
            class_embedding: match config.num_class_embeds {
                Some(classes) => Some(w.tensor("class_embedding.weight", [classes, temb])?),
                None => None,
            },
            add_embedding: match config.projection_class_embeddings_input_dim.filter(|_| config.addition_embed_type.is_some()) {
                Some(width) => Some(TimestepEmbedding::load(&w.pp("add_embedding"), width, temb)?),
                None => None,
            },
            conv_in: Conv2d::load(&w.pp("conv_in"), config.in_channels, ch[0], 3, 1, 1)?,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::load(&w.pp("conv_norm_out"), config.norm_num_groups, ch[0], config.norm_eps)?,
            conv_out: Conv2d::load(&w.pp("conv_out"), ch[0], config.out_channels, 3, 1, 1)?,
            config,
        })
    }

    /// Predicts noise (or v) for `sample` `[B, C, h, w]` at `timestep`, attending to the text
    /// states `[B, L, D]`, with `added` (and, for `text_time`, the pooled text) in the time
    /// embedding. The pipelines check that a family gives what its UNet takes.
    pub fn forward(&self, sample: Tensor<4>, timestep: f64, text: &TextConditioning, added: AddedConditioning) -> Tensor<4> {
        let batch = sample.dims()[0];
        let cfg = &self.config;
        let t_emb = timestep_embedding(&[timestep as f32], batch, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift, &sample.device());
        let mut temb = self.time_embedding.forward(t_emb);
        match (added, &self.class_embedding, &self.add_embedding, &text.pooled) {
            (AddedConditioning::ClassLabel(label), Some(table), _, _) => temb = temb + table.clone().narrow(0, label, 1).repeat_dim(0, batch),
            (AddedConditioning::TimeIds(ids), _, Some(add_embedding), Some(pooled)) => {
                let dim = cfg.addition_time_embed_dim.expect("text_time configs have it");
                let time_embeds = timestep_embedding(&ids, batch, dim, cfg.flip_sin_to_cos, cfg.freq_shift, &sample.device());
                temb = temb + add_embedding.forward(Tensor::cat(vec![pooled.clone(), time_embeds], 1));
            }
            _ => {}
        }
        let context = &text.hidden;

        let sample = if cfg.center_input_sample { sample * 2.0 - 1.0 } else { sample };
        let mut x = self.conv_in.forward(sample);
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            x = block.forward(x, &temb, context, &mut skips);
        }
        x = self.mid_block.forward(x, &temb, context);
        for block in &self.up_blocks {
            x = block.forward(x, &temb, context, &mut skips);
        }
        self.conv_out.forward(self.conv_norm_out.forward_silu(x))
    }
}
