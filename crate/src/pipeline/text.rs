//! A prompt's way to the UNet: each of the family's text encoders reads the prompt as
//! Automatic1111 does ([`prompt`]: emphasis, `BREAK`, 75-token chunks), and their states are
//! concatenated and batched for guidance ([`TextStates`]), with the pooled embedding of the
//! encoder that gives one (SDXL: of each prompt's first chunk, as Automatic1111 takes it).
use burn::tensor::{Tensor, TensorData};

use super::family::TextEncoderFolders;
use super::prompt;
use crate::error::{Error, Result};
use crate::files::{ModelFiles, json};
use crate::model::clip::{ClipTextConfig, ClipTextModel, HiddenLayer, Pooling};
use crate::model::tokenizer::{ClipTokenizer, TokenizerFiles};
use crate::model::unet::TextConditioning;
use crate::weights::Weights;

/// A tokenizer and its text encoder's weights: the model is built for each prompt encoding and
/// dropped after, so its GPU memory is free while the UNet runs.
pub struct TextEncoder {
    tokenizer: ClipTokenizer,
    weights: Weights,
    config: ClipTextConfig,
    layer: HiddenLayer,
    pooling: Pooling,
}

impl TextEncoder {
    /// Reads the folders' configs and tokenizer, and builds the model once so that damaged
    /// weights are refused when the pipeline loads.
    pub(super) fn load(files: &dyn ModelFiles, folders: &TextEncoderFolders, weights: Weights) -> Result<Self> {
        let config: ClipTextConfig = json(files, &folders.config())?;
        let tokenizer = ClipTokenizer::load(&TokenizerFiles::read(files, folders.tokenizer)?, config.max_position_embeddings)?;
        let id_bound = tokenizer.id_bound();
        if id_bound > config.vocab_size {
            return Err(Error::Invalid(format!(
                "{}: {} has token ids up to {} but {}'s vocab_size is {}",
                files.name(),
                folders.tokenizer,
                id_bound - 1,
                folders.encoder,
                config.vocab_size
            )));
        }
        let model = ClipTextModel::load(&weights, config.clone())?;
        if folders.pooling == Pooling::Projected && !model.has_projection() {
            return Err(Error::Invalid(format!(
                "{}: {} has no text_projection (a CLIPTextModelWithProjection's), whose pooled embedding the UNet takes",
                files.name(),
                folders.encoder
            )));
        }
        Ok(Self { tokenizer, weights, config, layer: folders.layer, pooling: folders.pooling })
    }

    /// The text encoder, built from its weights for one use.
    pub fn model(&self) -> Result<ClipTextModel> {
        ClipTextModel::load(&self.weights, self.config.clone())
    }

    /// The states `[chunks, len, D]` of the negative prompt's chunks (with guidance) then the
    /// prompt's, emphasis applied; the pooled embeddings `[chunks, P]` when this encoder gives
    /// them; and how many chunks are the negative prompt's.
    fn encode(&self, prompt: &str, negative: &str, guided: bool) -> Result<Encoded> {
        let positive = prompt::chunks(&self.tokenizer, prompt)?;
        let negative = if guided { prompt::chunks(&self.tokenizer, negative)? } else { Vec::new() };
        let chunks: Vec<_> = negative.iter().chain(&positive).collect();
        let ids: Vec<Vec<u32>> = chunks.iter().map(|c| c.ids.clone()).collect();
        let output = self.model()?.forward(&ids, self.layer, self.pooling);
        Ok(Encoded { hidden: emphasize(output.hidden, &chunks), pooled: output.pooled, negatives: negative.len() })
    }
}

/// One encoder's reading of the prompts.
struct Encoded {
    hidden: Tensor<3>,
    pooled: Option<Tensor<2>>,
    negatives: usize,
}

/// What the negative prompt conditions on with guidance.
#[derive(Clone, Copy, PartialEq)]
pub enum Negative {
    /// Its encoding.
    Encoded,
    /// Zeros when it is empty (SDXL's `force_zeros_for_empty_prompt`), else its encoding.
    ZerosWhenEmpty,
}

/// The prompts' text states from every encoder, concatenated along the features as the family
/// lists them; the negative prompt's only with guidance.
pub(super) fn encode(encoders: &[TextEncoder], prompt: &str, negative: &str, guided: bool, empty: Negative) -> Result<TextStates> {
    let zeros = guided && empty == Negative::ZerosWhenEmpty && negative.is_empty();
    let encoded = encoders.iter().map(|e| e.encode(prompt, negative, guided && !zeros)).collect::<Result<Vec<_>>>()?;
    // (chunks, negative chunks) per encoder: tokenizers of one family share a vocabulary.
    let split: Vec<_> = encoded.iter().map(|e| (e.hidden.dims()[0], e.negatives)).collect();
    if split.windows(2).any(|pair| pair[0] != pair[1]) {
        return Err(Error::Invalid(format!("the text encoders' tokenizers split the prompts into different chunks: {split:?}")));
    }
    let pooled = encoded.iter().find_map(|e| e.pooled.clone());
    let mut hidden: Vec<_> = encoded.into_iter().map(|e| e.hidden).collect();
    let hidden = if hidden.len() == 1 { hidden.remove(0) } else { Tensor::cat(hidden, 2) };
    if zeros {
        // diffusers' zeros_like of the prompt's states, as many chunks as the prompt's.
        let chunks = split[0].0;
        let with_zeros = |t: Tensor<3>| Tensor::cat(vec![t.zeros_like(), t], 0);
        let pooled = pooled.map(|p: Tensor<2>| Tensor::cat(vec![p.zeros_like(), p], 0));
        return Ok(TextStates::new(with_zeros(hidden), pooled, chunks, true));
    }
    Ok(TextStates::new(hidden, pooled, split[0].1, guided))
}

/// What the UNet attends to, batched for guidance.
#[derive(Clone)]
pub enum TextStates {
    /// No guidance: the prompt's.
    Single(TextConditioning),
    /// Guidance, both prompts of one length: `[negative, prompt]`, run as one batch.
    Paired(TextConditioning),
    /// Guidance, lengths that differ: two UNet calls a step (A1111 pads neither to the other).
    Separate { negative: TextConditioning, prompt: TextConditioning },
}

impl TextStates {
    /// From the encoders' `[chunks, 77, D]` and pooled `[chunks, P]`: the negative prompt's
    /// `negatives` chunks first; each prompt is pooled from its first chunk. One chunk each
    /// keeps the encoder's output as it is: reshaped and concatenated, the fused kernels that
    /// read it round differently, and plain prompts would change by 1/255.
    fn new(hidden: Tensor<3>, pooled: Option<Tensor<2>>, negatives: usize, guided: bool) -> Self {
        let [chunks, len, d] = hidden.dims();
        let first_chunks = |rows: &[usize]| pooled.as_ref().map(|p| Tensor::cat(rows.iter().map(|&r| p.clone().narrow(0, r, 1)).collect(), 0));
        let text = |hidden, rows: &[usize]| TextConditioning { hidden, pooled: first_chunks(rows) };
        let join = |from: usize, n: usize| hidden.clone().narrow(0, from, n).reshape([1, n * len, d]);
        match (guided, chunks - negatives) {
            (false, 1) => Self::Single(text(hidden, &[0])),
            (false, n) => Self::Single(text(join(0, n), &[0])),
            (true, 1) if negatives == 1 => Self::Paired(text(hidden, &[0, 1])),
            (true, n) if n == negatives => Self::Paired(text(Tensor::cat(vec![join(0, n), join(n, n)], 0), &[0, n])),
            (true, n) => Self::Separate { negative: text(join(0, negatives), &[0]), prompt: text(join(negatives, n), &[negatives]) },
        }
    }

    /// The same states with `f` applied to each conditioning.
    pub(super) fn map(self, f: impl Fn(TextConditioning) -> TextConditioning) -> Self {
        match self {
            Self::Single(text) => Self::Single(f(text)),
            Self::Paired(text) => Self::Paired(f(text)),
            Self::Separate { negative, prompt } => Self::Separate { negative: f(negative), prompt: f(prompt) },
        }
    }

    /// Every hidden state's sum, to check that all are finite.
    pub fn sum(&self) -> Tensor<1> {
        match self {
            Self::Single(text) | Self::Paired(text) => text.hidden.clone().sum(),
            Self::Separate { negative, prompt } => negative.hidden.clone().sum() + prompt.hidden.clone().sum(),
        }
    }
}

/// A1111's default ("Original") emphasis: each position's states times its weight, then
/// each chunk rescaled to the mean it had before. Unweighted prompts are left as they are.
fn emphasize(hidden: Tensor<3>, chunks: &[&prompt::Chunk]) -> Tensor<3> {
    if chunks.iter().all(|c| c.weights.iter().all(|&w| w == 1.0)) {
        return hidden;
    }
    let [n, len, _] = hidden.dims();
    let weights: Vec<f32> = chunks.iter().flat_map(|c| c.weights.iter().copied()).collect();
    let weights = Tensor::<3>::from_data(TensorData::new(weights, [n, len, 1]), &hidden.device());
    let mean = |t: &Tensor<3>| t.clone().mean_dim(2).mean_dim(1);
    let before = mean(&hidden);
    let weighted = hidden * weights;
    let after = mean(&weighted);
    weighted * (before / after)
}
