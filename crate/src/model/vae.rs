//! diffusers' `AutoencoderKL`: the encoder maps images to a latent Gaussian, the decoder maps latents back.
use burn::tensor::Tensor;
use serde::Deserialize;

use super::attention::Attention;
use super::nn::{Conv2d, GroupNorm};
use super::resnet::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};
use crate::error::{Error, Result};
use crate::weights::Weights;

/// The VAE's resnets and attention use eps 1e-6 regardless of the config.
const VAE_EPS: f64 = 1e-6;

#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub act_fn: String,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub sample_size: usize,
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
}

impl Default for VaeConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

impl VaeConfig {
    /// Pixels per latent along each axis.
    pub fn scale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    /// f32 bytes per latent pixel of the decoder's largest activation: the last up-sampler
    /// writes `block_out_channels[1]` channels at the full resolution.
    pub fn decoder_bytes_per_latent(&self) -> usize {
        let channels = self.block_out_channels.iter().take(2).max().copied().unwrap_or(0);
        4 * channels * self.scale_factor().pow(2)
    }

    /// f32 bytes per image pixel of the encoder's largest activation: its first block's
    /// `block_out_channels[0]` channels at the full resolution.
    pub fn encoder_bytes_per_pixel(&self) -> usize {
        4 * self.block_out_channels.first().copied().unwrap_or(0)
    }

    fn check(&self) -> std::result::Result<(), String> {
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(format!("block_out_channels, down_block_types and up_block_types must have the same non-zero length (got {n}, {}, {})", self.down_block_types.len(), self.up_block_types.len()));
        }
        if self.act_fn != "silu" {
            return Err(format!("unsupported VAE act_fn={}", self.act_fn));
        }
        if let Some(t) = self.down_block_types.iter().chain(&self.up_block_types).find(|t| *t != "DownEncoderBlock2D" && *t != "UpDecoderBlock2D") {
            return Err(format!("unsupported VAE block type {t}"));
        }
        if let Some(c) = self.block_out_channels.iter().find(|&&c| self.norm_num_groups == 0 || c % self.norm_num_groups != 0) {
            return Err(format!("{c} channels do not split into norm_num_groups={} groups", self.norm_num_groups));
        }
        // SD3 and Flux VAEs shift latents before scaling; Stable Diffusion's don't.
        if self.shift_factor.is_some_and(|s| s != 0.0) {
            return Err(format!("unsupported VAE shift_factor={:?} (a latent shift as in SD3 or Flux)", self.shift_factor));
        }
        Ok(())
    }

    fn resnet(&self) -> ResnetConfig {
        ResnetConfig { groups: self.norm_num_groups, eps: VAE_EPS, temb_channels: None, output_scale_factor: 1.0 }
    }
}

/// `UNetMidBlock2D` without time embedding: resnet, optional single-head attention, resnet.
pub struct MidBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub attention: Option<Attention>,
}

impl MidBlock2D {
    fn load(w: &Weights, channels: usize, cfg: &VaeConfig) -> Result<Self> {
        let resnets = (0..2).map(|j| ResnetBlock2D::load(&w.pp("resnets").pp(j), channels, channels, &cfg.resnet())).collect::<Result<_>>()?;
        let attention = if cfg.mid_block_add_attention {
            Some(Attention::load_vae(&w.pp("attentions.0"), channels, cfg.norm_num_groups, VAE_EPS)?)
        } else {
            None
        };
        Ok(Self { resnets, attention })
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut x = self.resnets[0].forward(x, None);
        if let Some(attention) = &self.attention {
            x = attention.forward_spatial(x);
        }
        self.resnets[1].forward(x, None)
    }
}

/// `DownEncoderBlock2D` / `UpDecoderBlock2D`: resnets then an optional resampler.
pub struct CoderBlock<S> {
    pub resnets: Vec<ResnetBlock2D>,
    pub sampler: Option<S>,
}

impl<S> CoderBlock<S> {
    fn load_resnets(w: &Weights, c_in: usize, c_out: usize, layers: usize, cfg: &VaeConfig) -> Result<Vec<ResnetBlock2D>> {
        (0..layers).map(|j| ResnetBlock2D::load(&w.pp("resnets").pp(j), if j == 0 { c_in } else { c_out }, c_out, &cfg.resnet())).collect()
    }

    fn run_resnets(&self, mut x: Tensor<4>) -> Tensor<4> {
        for resnet in &self.resnets {
            x = resnet.forward(x, None);
        }
        x
    }
}

pub struct Encoder {
    pub conv_in: Conv2d,
    pub down_blocks: Vec<CoderBlock<Downsample2D>>,
    pub mid_block: MidBlock2D,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

impl Encoder {
    fn load(w: &Weights, cfg: &VaeConfig) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let mut down_blocks = Vec::with_capacity(n);
        for i in 0..n {
            let bw = w.pp("down_blocks").pp(i);
            let c_in = if i == 0 { ch[0] } else { ch[i - 1] };
            let resnets = CoderBlock::<Downsample2D>::load_resnets(&bw, c_in, ch[i], cfg.layers_per_block, cfg)?;
            let sampler = if i + 1 < n { Some(Downsample2D::load(&bw.pp("downsamplers.0"), ch[i], 0)?) } else { None };
            down_blocks.push(CoderBlock { resnets, sampler });
        }
        Ok(Self {
            conv_in: Conv2d::load(&w.pp("conv_in"), cfg.in_channels, ch[0], 3, 1, 1)?,
            down_blocks,
            mid_block: MidBlock2D::load(&w.pp("mid_block"), ch[n - 1], cfg)?,
            conv_norm_out: GroupNorm::load(&w.pp("conv_norm_out"), cfg.norm_num_groups, ch[n - 1], VAE_EPS)?,
            conv_out: Conv2d::load(&w.pp("conv_out"), ch[n - 1], 2 * cfg.latent_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut x = self.conv_in.forward(x);
        for block in &self.down_blocks {
            x = block.run_resnets(x);
            if let Some(down) = &block.sampler {
                x = down.forward(x);
            }
        }
        let x = self.mid_block.forward(x);
        self.conv_out.forward(self.conv_norm_out.forward_silu(x))
    }
}

pub struct Decoder {
    pub conv_in: Conv2d,
    pub mid_block: MidBlock2D,
    pub up_blocks: Vec<CoderBlock<Upsample2D>>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

impl Decoder {
    fn load(w: &Weights, cfg: &VaeConfig) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let mut up_blocks = Vec::with_capacity(n);
        for i in 0..n {
            let bw = w.pp("up_blocks").pp(i);
            let (c_prev, c_out) = (ch[n - i.max(1)], ch[n - 1 - i]);
            let resnets = CoderBlock::<Upsample2D>::load_resnets(&bw, c_prev, c_out, cfg.layers_per_block + 1, cfg)?;
            let sampler = if i + 1 < n { Some(Upsample2D::load(&bw.pp("upsamplers.0"), c_out)?) } else { None };
            up_blocks.push(CoderBlock { resnets, sampler });
        }
        Ok(Self {
            conv_in: Conv2d::load(&w.pp("conv_in"), cfg.latent_channels, ch[n - 1], 3, 1, 1)?,
            mid_block: MidBlock2D::load(&w.pp("mid_block"), ch[n - 1], cfg)?,
            up_blocks,
            conv_norm_out: GroupNorm::load(&w.pp("conv_norm_out"), cfg.norm_num_groups, ch[0], VAE_EPS)?,
            conv_out: Conv2d::load(&w.pp("conv_out"), ch[0], cfg.out_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, z: Tensor<4>) -> Tensor<4> {
        let mut x = self.mid_block.forward(self.conv_in.forward(z));
        for block in &self.up_blocks {
            x = block.run_resnets(x);
            if let Some(up) = &block.sampler {
                x = up.forward(x);
            }
        }
        self.conv_out.forward(self.conv_norm_out.forward_silu(x))
    }
}

/// The VAE. The decoder is loaded with it and kept; the encoder, needed only to turn an input
/// image into latents, is built from the kept weights for each [`AutoencoderKL::encode`] and
/// dropped after, so its GPU memory is free the rest of the time.
pub struct AutoencoderKL {
    pub config: VaeConfig,
    pub decoder: Decoder,
    pub post_quant_conv: Option<Conv2d>,
    weights: Weights,
}

impl AutoencoderKL {
    pub fn load(w: &Weights, config: VaeConfig) -> Result<Self> {
        config.check().map_err(Error::Invalid)?;
        let z = config.latent_channels;
        let vae = Self {
            decoder: Decoder::load(&w.pp("decoder"), &config)?,
            post_quant_conv: if config.use_post_quant_conv { Some(Conv2d::load(&w.pp("post_quant_conv"), z, z, 1, 1, 0)?) } else { None },
            weights: w.clone(),
            config,
        };
        // Built once now, so a damaged encoder is refused when the model loads, not at its
        // first input image.
        vae.load_encoder()?;
        Ok(vae)
    }

    /// `encoder` and `quant_conv`.
    fn load_encoder(&self) -> Result<(Encoder, Option<Conv2d>)> {
        let (w, z2) = (&self.weights, 2 * self.config.latent_channels);
        let quant_conv = if self.config.use_quant_conv { Some(Conv2d::load(&w.pp("quant_conv"), z2, z2, 1, 1, 0)?) } else { None };
        Ok((Encoder::load(&w.pp("encoder"), &self.config)?, quant_conv))
    }

    /// Image `[B, 3, H, W]` in [-1, 1] → `(mean, logvar)` of the latent Gaussian, unscaled.
    pub fn encode(&self, image: Tensor<4>) -> Result<(Tensor<4>, Tensor<4>)> {
        let (encoder, quant_conv) = self.load_encoder()?;
        let mut moments = encoder.forward(image);
        if let Some(conv) = &quant_conv {
            moments = conv.forward(moments);
        }
        let mut halves = moments.chunk(2, 1);
        let logvar = halves.pop().expect("two halves").clamp(-30.0, 20.0);
        Ok((halves.pop().expect("two halves"), logvar))
    }

    /// Unscaled latents `[B, C, h, w]` → image in roughly [-1, 1].
    pub fn decode(&self, latents: Tensor<4>) -> Tensor<4> {
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(latents),
            None => latents,
        };
        self.decoder.forward(z)
    }
}
