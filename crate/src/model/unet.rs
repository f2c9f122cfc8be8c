//! diffusers' `UNet2DConditionModel` as SD 1.x / 2.x / Turbo, SDXL, the inpainting checkpoints
//! and the x4 upscaler use it, and as the latent x2 upscaler does with K-diffusion blocks (a
//! Fourier time embedding conditioned on the pooled text, no mid block), sized entirely by
//! `unet/config.json`.
use burn::tensor::Tensor;
use serde::Deserialize;

use super::config::PerBlock;
use super::embeddings::{GaussianFourierProjection, TimestepEmbedding, timestep_embedding};
use super::nn::{Activation, Conv2d, GroupNorm};
use super::resnet::{CondNormConfig, ResnetConfig};
use super::transformer_2d::Transformer2DConfig;
use super::unet_blocks::{BlockConfig, DownBlock2D, MidBlock2DCrossAttn, UpBlock2D, UpChannels};
use super::unet_k_blocks::{GROUP_SIZE as K_GROUP_SIZE, KAttentionConfig, KDownBlock2D, KUpBlock2D};
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
    /// `None`: no norm before `conv_out` (the K-diffusion UNet, whose blocks size their own groups).
    pub norm_num_groups: Option<usize>,
    pub norm_eps: f64,
    pub cross_attention_dim: PerBlock<usize>,
    pub transformer_layers_per_block: PerBlock<usize>,
    /// For SD 1.x/2.x this is, confusingly, the number of heads (diffusers keeps the name for
    /// compatibility); the K-diffusion blocks read it as the head width.
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
    /// Width of a condition projected into the time embedding's input (the latent upscaler's
    /// noise-level embedding and pooled text).
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
            norm_num_groups: Some(32),
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
    /// SD's blocks: the heads per block; K-diffusion blocks: the head width per block.
    attention: Vec<usize>,
    layers: Vec<usize>,
    transformer_layers: Vec<usize>,
    cross_dims: Vec<usize>,
    only_cross: Vec<bool>,
    act: Activation,
    /// The K-diffusion UNet's blocks (`KDownBlock2D`, ...) rather than SD's.
    k_blocks: bool,
}

const SD_BLOCKS: [&str; 4] = ["CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"];
const K_BLOCKS: [&str; 4] = ["KCrossAttnDownBlock2D", "KDownBlock2D", "KCrossAttnUpBlock2D", "KUpBlock2D"];

impl UNetConfig {
    /// Rejects what this engine does not implement, rather than computing something else.
    fn resolve(&self) -> std::result::Result<Resolved, String> {
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(format!("block_out_channels, down_block_types and up_block_types must have the same non-zero length (got {n}, {}, {})", self.down_block_types.len(), self.up_block_types.len()));
        }
        let types: Vec<&str> = self.down_block_types.iter().chain(&self.up_block_types).map(String::as_str).collect();
        let k_blocks = types.iter().all(|t| K_BLOCKS.contains(t));
        if !k_blocks && let Some(t) = types.iter().find(|t| !SD_BLOCKS.contains(t)) {
            return Err(format!("unsupported block type {t} (K-diffusion blocks do not mix with others)"));
        }
        let act = Activation::from_name(&self.act_fn).map_err(|e| e.to_string())?;
        // SD's blocks fuse SiLU into their group norms and shift by the time embedding; the
        // K-diffusion blocks size their own norms and take the activation from the config.
        let sd_only = [
            (act != Activation::Silu, format!("act_fn={}", self.act_fn)),
            (self.norm_num_groups.is_none(), "norm_num_groups null".into()),
            (self.time_cond_proj_dim.is_some(), "time_cond_proj_dim (guidance-embedded LCM UNets)".into()),
            (self.resnet_time_scale_shift != "default", format!("resnet_time_scale_shift={}", self.resnet_time_scale_shift)),
            (self.mid_block_type.as_deref() != Some("UNetMidBlock2DCrossAttn"), format!("mid_block_type={:?}", self.mid_block_type)),
        ];
        let k_only = [(self.mid_block_type.is_some(), format!("mid_block_type={:?} with K-diffusion blocks", self.mid_block_type))];
        let unsupported = [
            (self.dual_cross_attention, "dual_cross_attention".into()),
            (self.class_embed_type.is_some(), format!("class_embed_type={:?} (only a num_class_embeds table is implemented)", self.class_embed_type)),
            (self.class_embeddings_concat, "class_embeddings_concat".into()),
            (self.addition_embed_type.as_deref().is_some_and(|t| t != "text_time"), format!("addition_embed_type={:?} (text_time is implemented)", self.addition_embed_type)),
            (self.encoder_hid_dim.is_some(), "encoder_hid_dim".into()),
            (!["positional", "fourier"].contains(&self.time_embedding_type.as_str()), format!("time_embedding_type={}", self.time_embedding_type)),
            (self.time_embedding_act_fn.is_some(), "time_embedding_act_fn".into()),
            (self.conv_in_kernel % 2 == 0 || self.conv_out_kernel % 2 == 0, "even conv_in/conv_out kernels".into()),
            (self.attention_type != "default", format!("attention_type={}", self.attention_type)),
        ];
        let model_specific = if k_blocks { k_only.to_vec() } else { sd_only.to_vec() };
        if let Some((_, what)) = unsupported.into_iter().chain(model_specific).find(|(bad, _)| *bad) {
            return Err(format!("unsupported UNet feature: {what}"));
        }
        if let Some(act) = &self.timestep_post_act {
            Activation::from_name(act).map_err(|e| format!("timestep_post_act: {e}"))?;
        }
        if self.addition_embed_type.is_some() && (self.addition_time_embed_dim.is_none() || self.projection_class_embeddings_input_dim.is_none()) {
            return Err("addition_embed_type text_time needs addition_time_embed_dim and projection_class_embeddings_input_dim".into());
        }
        let list = |name: &str, v: &PerBlock<usize>| v.expand(n).ok_or_else(|| format!("{name} must have one entry per block ({n})"));
        let attention = if k_blocks {
            list("attention_head_dim", &self.attention_head_dim)?
        } else {
            list("num_attention_heads", self.num_attention_heads.as_ref().unwrap_or(&self.attention_head_dim))?
        };
        let groups = self.norm_num_groups.unwrap_or(1);
        for (i, (&a, &c)) in attention.iter().zip(&self.block_out_channels).enumerate() {
            if a == 0 || c % a != 0 || groups == 0 || c % groups != 0 {
                return Err(format!("block {i}: {c} channels do not split into {a} heads and {groups} groups"));
            }
            if k_blocks && c < K_GROUP_SIZE {
                return Err(format!("block {i}: K-diffusion blocks need at least {K_GROUP_SIZE} channels (one group), not {c}"));
            }
        }
        Ok(Resolved {
            attention,
            layers: list("layers_per_block", &self.layers_per_block)?,
            transformer_layers: list("transformer_layers_per_block", &self.transformer_layers_per_block)?,
            cross_dims: list("cross_attention_dim", &self.cross_attention_dim)?,
            only_cross: self.only_cross_attention.expand(n).ok_or_else(|| format!("only_cross_attention must have one entry per block ({n})"))?,
            act,
            k_blocks,
        })
    }

    /// Width of the time embedding: diffusers' default is 4 × the first block's channels for
    /// sinusoidal timesteps, 2 × for Fourier ones.
    fn time_embed_dim(&self) -> usize {
        let factor = if self.time_embedding_type == "fourier" { 2 } else { 4 };
        self.time_embedding_dim.unwrap_or(self.block_out_channels[0] * factor)
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
/// `[B, P]` of the families whose UNet also adds it to the time embedding (SDXL; the latent
/// upscaler's behind its noise-level embedding, as its `timestep_cond`).
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
    /// `time_proj` of a Fourier time embedding; sinusoidal timesteps have no weights.
    pub time_proj: Option<GaussianFourierProjection>,
    pub time_embedding: TimestepEmbedding,
    /// `[num_class_embeds, time embedding width]`, when the config has a class table.
    pub class_embedding: Option<Tensor<2>>,
    /// `text_time`'s MLP from the pooled embedding and the time ids' embeddings.
    pub add_embedding: Option<TimestepEmbedding>,
    pub conv_in: Conv2d,
    pub blocks: Blocks,
    pub conv_norm_out: Option<GroupNorm>,
    pub conv_out: Conv2d,
    act: Activation,
}

/// The down, mid and up blocks.
pub enum Blocks {
    /// Stable Diffusion's: resnets with transformers, and a cross-attention mid block.
    Sd { down_blocks: Vec<DownBlock2D>, mid_block: MidBlock2DCrossAttn, up_blocks: Vec<UpBlock2D> },
    /// The K-diffusion UNet's (the latent upscaler), without a mid block.
    K { down_blocks: Vec<KDownBlock2D>, up_blocks: Vec<KUpBlock2D> },
}

impl UNet2DConditionModel {
    pub fn load(w: &Weights, config: UNetConfig) -> Result<Self> {
        let r = config.resolve().map_err(Error::Invalid)?;
        let ch = &config.block_out_channels;
        let temb = config.time_embed_dim();
        let (time_proj, time_input) = if config.time_embedding_type == "fourier" {
            (Some(GaussianFourierProjection::load(&w.pp("time_proj"), temb / 2, config.flip_sin_to_cos)?), temb)
        } else {
            (None, ch[0])
        };
        let post_act = config.timestep_post_act.as_deref().map(Activation::from_name).transpose()?;
        let conv = |name: &str, c_in: usize, c_out: usize, kernel: usize| Conv2d::load(&w.pp(name), c_in, c_out, kernel, 1, (kernel - 1) / 2);
        Ok(Self {
            time_proj,
            time_embedding: TimestepEmbedding::load_with(&w.pp("time_embedding"), time_input, temb, config.time_cond_proj_dim, r.act, post_act)?,
            class_embedding: match config.num_class_embeds {
                Some(classes) => Some(w.tensor("class_embedding.weight", [classes, temb])?),
                None => None,
            },
            add_embedding: match config.projection_class_embeddings_input_dim.filter(|_| config.addition_embed_type.is_some()) {
                Some(width) => Some(TimestepEmbedding::load(&w.pp("add_embedding"), width, temb)?),
                None => None,
            },
            conv_in: conv("conv_in", config.in_channels, ch[0], config.conv_in_kernel)?,
            blocks: if r.k_blocks { Blocks::load_k(w, &config, &r, temb)? } else { Blocks::load_sd(w, &config, &r, temb)? },
            conv_norm_out: match config.norm_num_groups {
                Some(groups) => Some(GroupNorm::load(&w.pp("conv_norm_out"), groups, ch[0], config.norm_eps)?),
                None => None,
            },
            conv_out: conv("conv_out", ch[0], config.out_channels, config.conv_out_kernel)?,
            act: r.act,
            config,
        })
    }

    /// Predicts noise (or v, or the latent upscaler's output) for `sample` `[B, C, h, w]` at
    /// `timestep`, attending to the text states `[B, L, D]`, with `added` (and, for `text_time`,
    /// the pooled text; for a `time_cond_proj_dim` UNet, `text.pooled` as the condition) in the
    /// time embedding. The pipelines check that a family gives what its UNet takes.
    pub fn forward(&self, sample: Tensor<4>, timestep: f64, text: &TextConditioning, added: AddedConditioning) -> Tensor<4> {
        let batch = sample.dims()[0];
        let cfg = &self.config;
        let device = sample.device();
        let t_emb = match &self.time_proj {
            Some(fourier) => fourier.forward(timestep as f32, batch, &device),
            None => timestep_embedding(&[timestep as f32], batch, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift, &device),
        };
        let condition = self.time_embedding.cond_proj.as_ref().and(text.pooled.clone());
        let mut temb = self.time_embedding.forward(t_emb, condition);
        match (added, &self.class_embedding, &self.add_embedding, &text.pooled) {
            (AddedConditioning::ClassLabel(label), Some(table), _, _) => temb = temb + table.clone().narrow(0, label, 1).repeat_dim(0, batch),
            (AddedConditioning::TimeIds(ids), _, Some(add_embedding), Some(pooled)) => {
                let dim = cfg.addition_time_embed_dim.expect("text_time configs have it");
                let time_embeds = timestep_embedding(&ids, batch, dim, cfg.flip_sin_to_cos, cfg.freq_shift, &device);
                temb = temb + add_embedding.forward(Tensor::cat(vec![pooled.clone(), time_embeds], 1), None);
            }
            _ => {}
        }
        let sample = if cfg.center_input_sample { sample * 2.0 - 1.0 } else { sample };
        let x = self.blocks.forward(self.conv_in.forward(sample), &temb, &text.hidden);
        let x = match &self.conv_norm_out {
            Some(norm) if self.act == Activation::Silu => norm.forward_silu(x),
            Some(norm) => self.act.apply(norm.forward(x)),
            None => x,
        };
        self.conv_out.forward(x)
    }
}

impl Blocks {
    fn load_sd(w: &Weights, config: &UNetConfig, r: &Resolved, temb: usize) -> Result<Self> {
        let ch = &config.block_out_channels;
        let n = ch.len();
        let groups = config.norm_num_groups.expect("resolve requires groups for SD's blocks");
        // The mid block never restricts itself to cross-attention (diffusers ignores
        // only_cross_attention for UNetMidBlock2DCrossAttn).
        let block_cfg = |i: usize, cross: bool, only_cross: bool, scale: f64| BlockConfig {
            resnet: ResnetConfig { groups, eps: config.norm_eps, temb_channels: Some(temb), output_scale_factor: scale },
            transformer: cross.then(|| Transformer2DConfig {
                heads: r.attention[i],
                head_dim: ch[i] / r.attention[i],
                num_layers: r.transformer_layers[i],
                context_dim: r.cross_dims[i],
                norm_num_groups: groups,
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
        Ok(Self::Sd { down_blocks, mid_block, up_blocks })
    }

    /// diffusers' wiring of the K-diffusion blocks, including that up block `i` takes the head
    /// width of down block `i`, not of its mirror (its text width is its mirror's).
    fn load_k(w: &Weights, config: &UNetConfig, r: &Resolved, temb: usize) -> Result<Self> {
        let ch = &config.block_out_channels;
        let n = ch.len();
        let cfg = CondNormConfig { temb_channels: temb, group_size: K_GROUP_SIZE, eps: config.norm_eps, act: r.act };
        let attention = |heads_of: usize, text_of: usize, kind: &str| {
            kind.starts_with("KCrossAttn").then(|| KAttentionConfig { head_dim: r.attention[heads_of], context_dim: r.cross_dims[text_of] })
        };
        let mut down_blocks = Vec::with_capacity(n);
        for (i, kind) in config.down_block_types.iter().enumerate() {
            let c_in = if i == 0 { ch[0] } else { ch[i - 1] };
            down_blocks.push(KDownBlock2D::load(&w.pp("down_blocks").pp(i), c_in, ch[i], r.layers[i], i + 1 < n, attention(i, i, kind), &cfg)?);
        }
        let mut up_blocks = Vec::with_capacity(n);
        for (i, kind) in config.up_block_types.iter().enumerate() {
            let d = n - 1 - i;
            let c_in = ch[d.saturating_sub(1)];
            up_blocks.push(KUpBlock2D::load(&w.pp("up_blocks").pp(i), c_in, ch[d], r.layers[d] + 1, i + 1 < n, attention(i, d, kind), &cfg)?);
        }
        Ok(Self::K { down_blocks, up_blocks })
    }

    fn forward(&self, mut x: Tensor<4>, temb: &Tensor<2>, context: &Tensor<3>) -> Tensor<4> {
        match self {
            Self::Sd { down_blocks, mid_block, up_blocks } => {
                let mut skips = vec![x.clone()];
                for block in down_blocks {
                    x = block.forward(x, temb, context, &mut skips);
                }
                x = mid_block.forward(x, temb, context);
                for block in up_blocks {
                    x = block.forward(x, temb, context, &mut skips);
                }
            }
            Self::K { down_blocks, up_blocks } => {
                let mut skips = vec![Some(x.clone())];
                for block in down_blocks {
                    x = block.forward(x, temb, context, &mut skips);
                }
                for block in up_blocks {
                    x = block.forward(x, temb, context, &mut skips);
                }
            }
        }
        x
    }
}
