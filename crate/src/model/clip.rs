//! transformers' `CLIPTextModel` and `CLIPTextModelWithProjection`: token + position
//! embeddings, a causal pre-norm transformer and the final layer norm. SD conditions its UNet on
//! the final states (`last_hidden_state`); SDXL on the penultimate layer's (before the final
//! norm) and on the end token's projected state (`text_embeds`); the latent x2 upscaler on the
//! last layer's before the final norm and on the end token's final state (`pooler_output`).
use burn::tensor::activation::{gelu, sigmoid};
use burn::tensor::{Tensor, TensorData};
use serde::Deserialize;

use super::nn::{LayerNorm, Linear};
use crate::error::{Error, Result};
use crate::kernels::{self, LinearEpilogue};
use crate::weights::Weights;

#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    /// Width of `text_projection` (`CLIPTextModelWithProjection`).
    pub projection_dim: usize,
    /// The token whose final state is pooled; 2 (old configs) means the largest id instead.
    pub eos_token_id: u32,
    /// The transformers classes the weights were saved from (`CLIPTextModelWithProjection` has
    /// `text_projection`).
    pub architectures: Vec<String>,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            projection_dim: 512,
            eos_token_id: 49407,
            architectures: Vec::new(),
        }
    }
}

#[derive(Clone, Copy)]
enum Activation {
    QuickGelu,
    Gelu,
}

impl Activation {
    fn apply(self, x: Tensor<3>) -> Tensor<3> {
        match self {
            // x * sigmoid(1.702 x): the approximation OpenAI's CLIP was trained with.
            Activation::QuickGelu => x.clone() * sigmoid(x * 1.702),
            Activation::Gelu => gelu(x),
        }
    }
}

struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl EncoderLayer {
    fn load(w: &Weights, cfg: &ClipTextConfig) -> Result<Self> {
        let (d, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        let attn = w.pp("self_attn");
        Ok(Self {
            layer_norm1: LayerNorm::load(&w.pp("layer_norm1"), d, eps)?,
            q_proj: Linear::load(&attn.pp("q_proj"), d, d, true)?,
            k_proj: Linear::load(&attn.pp("k_proj"), d, d, true)?,
            v_proj: Linear::load(&attn.pp("v_proj"), d, d, true)?,
            out_proj: Linear::load(&attn.pp("out_proj"), d, d, true)?,
            layer_norm2: LayerNorm::load(&w.pp("layer_norm2"), d, eps)?,
            fc1: Linear::load(&w.pp("mlp.fc1"), d, cfg.intermediate_size, true)?,
            fc2: Linear::load(&w.pp("mlp.fc2"), cfg.intermediate_size, d, true)?,
        })
    }

    fn forward(&self, x: Tensor<3>, heads: usize, act: Activation) -> Tensor<3> {
        let h = self.layer_norm1.forward(x.clone());
        let attended = kernels::attention(self.q_proj.forward(h.clone()), self.k_proj.forward(h.clone()), self.v_proj.forward(h), heads, true);
        let x = self.out_proj.forward_with(attended, LinearEpilogue { residual: Some(x), geglu: false });
        let h = self.fc1.forward(self.layer_norm2.forward(x.clone()));
        self.fc2.forward_with(act.apply(h), LinearEpilogue { residual: Some(x), geglu: false })
    }
}

/// Which layer's states a pipeline conditions on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum HiddenLayer {
    /// `last_hidden_state`: the last layer's, after the final norm (SD 1.x / 2.x).
    Last,
    /// `hidden_states[-1]`: the last layer's, without the final norm (the latent x2 upscaler).
    LastBeforeNorm,
    /// `hidden_states[-2]`: the layer before the last, without the final norm (SDXL).
    Penultimate,
}

/// Which pooled embedding a pipeline takes besides the states: the end token's final state.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pooling {
    None,
    /// `pooler_output` (the latent x2 upscaler).
    Final,
    /// `text_embeds`: through `text_projection` (SDXL's second encoder).
    Projected,
}

/// A forward pass's outputs.
pub struct ClipOutput {
    /// `[B, len, hidden]` of the requested layer.
    pub hidden: Tensor<3>,
    /// The end token's final state `[B, hidden]`, or through `text_projection`
    /// `[B, projection_dim]`, as asked.
    pub pooled: Option<Tensor<2>>,
}

pub struct ClipTextModel {
    pub config: ClipTextConfig,
    /// The token table stays on the host: a prompt needs only 77 of its rows, and the whole
    /// table (49408 rows) is larger than one GPU binding may be (128 MiB by default).
    token_embedding: Vec<f32>,
    position_embedding: Tensor<2>,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    /// `CLIPTextModelWithProjection`'s, when the file has it.
    text_projection: Option<Linear>,
    activation: Activation,
}

impl ClipTextModel {
    pub fn load(w: &Weights, config: ClipTextConfig) -> Result<Self> {
        let activation = match config.hidden_act.as_str() {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            other => return Err(Error::Invalid(format!("unsupported CLIP hidden_act={other} (quick_gelu and gelu are)"))),
        };
        if config.num_attention_heads == 0 || config.hidden_size % config.num_attention_heads != 0 {
            return Err(Error::Invalid(format!("CLIP hidden_size {} does not split into {} heads", config.hidden_size, config.num_attention_heads)));
        }
        let d = config.hidden_size;
        let with_projection = w.contains("text_projection.weight") || config.architectures.iter().any(|a| a == "CLIPTextModelWithProjection");
        let text_projection = if with_projection { Some(Linear::load(&w.pp("text_projection"), d, config.projection_dim, false)?) } else { None };
        // Published repos prefix every name with `text_model.`; transformers 5 saves without it.
        let w = if w.contains("text_model.final_layer_norm.weight") { w.pp("text_model") } else { w.clone() };
        let layers = (0..config.num_hidden_layers).map(|i| EncoderLayer::load(&w.pp("encoder.layers").pp(i), &config)).collect::<Result<_>>()?;
        Ok(Self {
            token_embedding: w.values("embeddings.token_embedding.weight", &[config.vocab_size, d])?,
            position_embedding: w.tensor("embeddings.position_embedding.weight", [config.max_position_embeddings, d])?,
            layers,
            final_layer_norm: LayerNorm::load(&w.pp("final_layer_norm"), d, config.layer_norm_eps)?,
            text_projection,
            activation,
            config,
        })
    }

    /// Whether the file has `text_projection` (`CLIPTextModelWithProjection`).
    pub fn has_projection(&self) -> bool {
        self.text_projection.is_some()
    }

    /// Token ids `[B][77]` → the `layer`'s states `[B, 77, hidden]` and the `pooling` asked for
    /// ([`Pooling::Projected`] needs [`Self::has_projection`]). Ids come from the tokenizer, so
    /// they index the vocabulary.
    pub fn forward(&self, ids: &[Vec<u32>], layer: HiddenLayer, pooling: Pooling) -> ClipOutput {
        let (batch, len, d) = (ids.len(), ids[0].len(), self.config.hidden_size);
        let rows: Vec<f32> = ids.iter().flatten().flat_map(|&t| &self.token_embedding[t as usize * d..(t as usize + 1) * d]).copied().collect();
        let tokens = Tensor::<3>::from_data(TensorData::new(rows, [batch, len, d]), &self.position_embedding.device());
        let positions = self.position_embedding.clone().narrow(0, 0, len).unsqueeze::<3>();
        let mut x = tokens + positions;
        let (last, before_last) = self.layers.split_last().expect("configs have layers");
        for layer in before_last {
            x = layer.forward(x, self.config.num_attention_heads, self.activation);
        }
        if layer == HiddenLayer::Penultimate && pooling == Pooling::None {
            return ClipOutput { hidden: x, pooled: None };
        }
        let penultimate = x.clone();
        let before_norm = last.forward(x, self.config.num_attention_heads, self.activation);
        let last_hidden_state = self.final_layer_norm.forward(before_norm.clone());
        let pooled = match pooling {
            Pooling::None => None,
            Pooling::Final => Some(self.pooler_output(&last_hidden_state, ids)),
            Pooling::Projected => Some(self.text_projection.as_ref().expect("callers ask for text_embeds only with a projection").forward(self.pooler_output(&last_hidden_state, ids))),
        };
        let hidden = match layer {
            HiddenLayer::Last => last_hidden_state,
            HiddenLayer::LastBeforeNorm => before_norm,
            HiddenLayer::Penultimate => penultimate,
        };
        ClipOutput { hidden, pooled }
    }

    /// transformers' pooling: each row's state at its first end token (its largest id for
    /// configs with the old `eos_token_id` 2).
    fn pooler_output(&self, last_hidden_state: &Tensor<3>, ids: &[Vec<u32>]) -> Tensor<2> {
        let d = self.config.hidden_size;
        let eos = self.config.eos_token_id;
        let rows: Vec<Tensor<2>> = ids
            .iter()
            .enumerate()
            .map(|(b, row)| {
                let first = |target: u32| row.iter().position(|&t| t == target).unwrap_or(0);
                let at = if eos == 2 { first(*row.iter().max().expect("ids")) } else { first(eos) };
                last_hidden_state.clone().narrow(0, b, 1).narrow(1, at, 1).reshape([1, d])
            })
            .collect();
        Tensor::cat(rows, 0)
    }
}
