//! diffusers' `AutoencoderTiny` (TAESD): a decoder from the VAE's latents about a hundred times
//! cheaper than the VAE's, which the live preview runs after every step. Only the decoder is
//! loaded; a published TAESD repo holds `config.json` and the weights at its top.
use burn::tensor::Tensor;
use burn::tensor::activation::relu;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn::tensor::Device;
use serde::Deserialize;

use super::nn::Conv2d;
use crate::error::{Error, Result};
use crate::files::{ModelFiles, json};
use crate::kernels::Conv2dEpilogue;
use crate::weights::{Uploaded, Weights};

/// The repo's files: its config, and the weight file's stem.
pub const CONFIG: &str = "config.json";
pub const WEIGHT_STEM: &str = "diffusion_pytorch_model";

#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct AutoencoderTinyConfig {
    #[serde(rename = "_class_name")]
    pub class_name: String,
    pub out_channels: usize,
    pub latent_channels: usize,
    pub decoder_block_out_channels: Vec<usize>,
    pub num_decoder_blocks: Vec<usize>,
    pub upsampling_scaling_factor: usize,
    pub act_fn: String,
    pub upsample_fn: String,
}

impl Default for AutoencoderTinyConfig {
    fn default() -> Self {
        Self {
            class_name: "AutoencoderTiny".into(),
            out_channels: 3,
            latent_channels: 4,
            decoder_block_out_channels: vec![64; 4],
            num_decoder_blocks: vec![3, 3, 3, 1],
            upsampling_scaling_factor: 2,
            act_fn: "relu".into(),
            upsample_fn: "nearest".into(),
        }
    }
}

impl AutoencoderTinyConfig {
    /// Pixels per latent along each axis.
    pub fn scale_factor(&self) -> usize {
        self.upsampling_scaling_factor.pow(self.num_decoder_blocks.len().saturating_sub(1) as u32)
    }

    fn check(&self) -> std::result::Result<(), String> {
        if self.class_name != "AutoencoderTiny" {
            return Err(format!("it is a {}, not a tiny autoencoder (AutoencoderTiny, as TAESD repos are)", self.class_name));
        }
        let channels = &self.decoder_block_out_channels;
        if channels.is_empty() || channels.len() != self.num_decoder_blocks.len() {
            return Err(format!("decoder_block_out_channels and num_decoder_blocks must have the same non-zero length (got {} and {})", channels.len(), self.num_decoder_blocks.len()));
        }
        // Each level's blocks keep the channels the level before ended with.
        if channels.iter().any(|&c| c != channels[0]) {
            return Err(format!("decoder_block_out_channels {channels:?} differ, which diffusers' DecoderTiny cannot build"));
        }
        if self.act_fn != "relu" || self.upsample_fn != "nearest" || self.upsampling_scaling_factor == 0 {
            return Err(format!("act_fn {} / upsample_fn {} / upsampling_scaling_factor {} (Kiln reads relu / nearest / ≥ 1)", self.act_fn, self.upsample_fn, self.upsampling_scaling_factor));
        }
        Ok(())
    }
}

/// conv, ReLU, conv, ReLU, conv, plus the input, then ReLU. Its input and output channels are
/// equal in every decoder, so the skip is the identity.
pub struct AutoencoderTinyBlock {
    pub conv: [Conv2d; 3],
}

impl AutoencoderTinyBlock {
    fn load(w: &Weights, channels: usize) -> Result<Self> {
        let conv = |i: usize| Conv2d::load(&w.pp("conv").pp(i), channels, channels, 3, 1, 1);
        Ok(Self { conv: [conv(0)?, conv(2)?, conv(4)?] })
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let h = relu(self.conv[1].forward(relu(self.conv[0].forward(x.clone()))));
        relu(self.conv[2].forward_with(h, Conv2dEpilogue { residual: Some(x), ..Default::default() }))
    }
}

/// One entry of `DecoderTiny.layers`, the `nn.Sequential` the weights are numbered by.
pub enum Layer {
    Conv(Conv2d),
    Relu,
    Block(AutoencoderTinyBlock),
    Upsample,
}

pub struct DecoderTiny {
    pub layers: Vec<Layer>,
    upsampling: usize,
}

impl DecoderTiny {
    fn load(w: &Weights, cfg: &AutoencoderTinyConfig) -> Result<Self> {
        let w = w.pp("layers");
        let channels = cfg.decoder_block_out_channels[0];
        let mut layers = vec![Layer::Conv(Conv2d::load(&w.pp(0), cfg.latent_channels, channels, 3, 1, 1)?), Layer::Relu];
        let levels = cfg.num_decoder_blocks.len();
        for (level, &blocks) in cfg.num_decoder_blocks.iter().enumerate() {
            for _ in 0..blocks {
                layers.push(Layer::Block(AutoencoderTinyBlock::load(&w.pp(layers.len()), channels)?));
            }
            let last = level + 1 == levels;
            if !last {
                layers.push(Layer::Upsample);
            }
            let conv = w.pp(layers.len());
            layers.push(Layer::Conv(if last { Conv2d::load(&conv, channels, cfg.out_channels, 3, 1, 1)? } else { Conv2d::load_unbiased(&conv, channels, channels, 3, 1)? }));
        }
        Ok(Self { layers, upsampling: cfg.upsampling_scaling_factor })
    }

    fn forward(&self, latents: Tensor<4>) -> Tensor<4> {
        // diffusers clamps the latents softly to ±3 first.
        let mut x = latents.div_scalar(3.0).tanh().mul_scalar(3.0);
        for layer in &self.layers {
            x = match layer {
                Layer::Conv(conv) => conv.forward(x),
                Layer::Relu => relu(x),
                Layer::Block(block) => block.forward(x),
                Layer::Upsample => {
                    let [_, _, h, w] = x.dims();
                    let f = self.upsampling;
                    interpolate(x, InterpolateOptions::new(InterpolateMode::Nearest).with_output_size([h * f, w * f]))
                }
            };
        }
        // From [0, 1] to diffusers' [-1, 1].
        x.mul_scalar(2.0).sub_scalar(1.0)
    }
}

pub struct AutoencoderTiny {
    pub decoder: DecoderTiny,
    pub config: AutoencoderTinyConfig,
}

impl AutoencoderTiny {
    /// Loads the decoder of a TAESD repo (`files`), its weights as published.
    pub fn load(files: &dyn ModelFiles, device: &Device) -> Result<Self> {
        let config: AutoencoderTinyConfig = json(files, CONFIG)?;
        config.check().map_err(|msg| Error::Config { path: files.label(CONFIG), msg })?;
        let weights = Weights::uploaded(Uploaded::from_file(files, WEIGHT_STEM, None, &Default::default(), device)?, device);
        Ok(Self { decoder: DecoderTiny::load(&weights.pp("decoder"), &config)?, config })
    }

    /// The image `[N, 3, H, W]` in [-1, 1] of the scaled latents the UNet denoises (TAESD's
    /// scaling factor is 1, so they go in as they are).
    pub fn decode(&self, latents: Tensor<4>) -> Tensor<4> {
        self.decoder.forward(latents)
    }
}
