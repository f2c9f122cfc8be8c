//! The model families Kiln runs, each described once: the diffusers pipeline classes that load
//! as it, its text encoders with their tokenizers (built on demand, [`on_demand`]), its own
//! config files, and what its UNet is conditioned on besides the text. Loading
//! (`StableDiffusion::assemble`), the file lists (`layout.rs`), which weights wait on the host
//! and the modes read these descriptions; a new family is a row in [`FAMILIES`].
use serde::Deserialize;

use super::upscale::UpscalerConfig;
use crate::error::{Error, Result};
use crate::files::{ModelFiles, json};
use crate::model::clip::{HiddenLayer, Pooling};
use crate::model::tokenizer;
use crate::model::unet::UNetConfig;

/// The file that says which diffusers pipeline a folder is.
pub const MODEL_INDEX: &str = "model_index.json";

/// `model_index.json`: which diffusers pipeline the folder is, and its settings.
#[derive(Deserialize)]
pub struct ModelIndex {
    #[serde(rename = "_class_name")]
    pub class_name: String,
    /// The x4 upscaler's highest noise level (diffusers' default 350).
    pub max_noise_level: Option<usize>,
    /// SDXL: an empty negative prompt conditions on zeros (diffusers' default true).
    pub force_zeros_for_empty_prompt: Option<bool>,
    /// SDXL's refiner conditions on an aesthetic score, which Kiln does not run.
    #[serde(default)]
    pub requires_aesthetics_score: bool,
}

pub struct Family {
    /// What the family is called in messages.
    pub name: &'static str,
    /// diffusers' `_class_name`s that load as this family.
    pub pipelines: &'static [&'static str],
    /// Its text encoders and their tokenizers, whose states the UNet attends to, concatenated
    /// in this order.
    pub text_encoders: &'static [TextEncoderFolders],
    /// Config files of its own components, beside the ones every family has.
    pub configs: &'static [&'static str],
    /// diffusers' default guidance scale for its pipelines.
    pub guidance: f64,
    /// Reads what the family's UNet takes besides the text from its files.
    conditioner: fn(&dyn ModelFiles, &ModelIndex, &UNetConfig) -> Result<Conditioner>,
}

/// A text encoder's folder and its tokenizer's, and what the UNet takes of its outputs.
pub struct TextEncoderFolders {
    pub encoder: &'static str,
    pub tokenizer: &'static str,
    /// The layer whose states the UNet attends to.
    pub layer: HiddenLayer,
    /// The pooled embedding that also conditions the UNet (SDXL's second encoder's, the latent
    /// upscaler's).
    pub pooling: Pooling,
}

impl TextEncoderFolders {
    pub fn config(&self) -> String {
        format!("{}/config.json", self.encoder)
    }

    /// The weight file's stem.
    pub fn weights(&self) -> String {
        format!("{}/model", self.encoder)
    }
}

/// What a family's UNet is conditioned on besides the text, as its files set it.
pub enum Conditioner {
    /// The text alone.
    Text,
    /// The x4 upscaler: the low-resolution image, noised to a level that is also the UNet's class label.
    NoiseLevel(UpscalerConfig),
    /// SDXL: the pooled text embedding and the image's size (`text_time` time ids); with
    /// `force_zeros_for_empty_prompt` an empty negative prompt conditions on zeros.
    TextTime { force_zeros_for_empty_prompt: bool },
    /// The latent x2 upscaler: an image's latents as extra channels, and a noise-level
    /// embedding with the pooled text as the time embedding's condition.
    LatentUpscale,
}

const CLIP: TextEncoderFolders = TextEncoderFolders { encoder: "text_encoder", tokenizer: "tokenizer", layer: HiddenLayer::Last, pooling: Pooling::None };
const SDXL_CLIP_L: TextEncoderFolders = TextEncoderFolders { encoder: "text_encoder", tokenizer: "tokenizer", layer: HiddenLayer::Penultimate, pooling: Pooling::None };
const SDXL_CLIP_G: TextEncoderFolders = TextEncoderFolders { encoder: "text_encoder_2", tokenizer: "tokenizer_2", layer: HiddenLayer::Penultimate, pooling: Pooling::Projected };
const LATENT_UPSCALER_CLIP: TextEncoderFolders = TextEncoderFolders { encoder: "text_encoder", tokenizer: "tokenizer", layer: HiddenLayer::LastBeforeNorm, pooling: Pooling::Final };

/// Every family, in the order an unknown pipeline's message lists them.
pub const FAMILIES: [Family; 4] = [
    Family {
        name: "Stable Diffusion (1.x, 2.x, Turbo, inpainting)",
        pipelines: &["StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"],
        text_encoders: &[CLIP],
        configs: &[],
        guidance: super::DEFAULT_GUIDANCE,
        conditioner: |_, _, unet| without_added_embedding(unet).map(|()| Conditioner::Text),
    },
    Family {
        name: "Stable Diffusion XL (base, Turbo)",
        pipelines: &["StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"],
        text_encoders: &[SDXL_CLIP_L, SDXL_CLIP_G],
        configs: &[],
        guidance: 5.0,
        conditioner: |files, index, unet| text_time(&files.name(), index, unet),
    },
    Family {
        name: "the Stable Diffusion x4 upscaler",
        pipelines: &["StableDiffusionUpscalePipeline"],
        text_encoders: &[CLIP],
        configs: &[UpscalerConfig::LOW_RES_SCHEDULER],
        guidance: 9.0,
        conditioner: |files, index, unet| Ok(Conditioner::NoiseLevel(UpscalerConfig::load(files, index.max_noise_level, unet)?)),
    },
    Family {
        name: "the Stable Diffusion x2 latent upscaler",
        pipelines: &["StableDiffusionLatentUpscalePipeline"],
        text_encoders: &[LATENT_UPSCALER_CLIP],
        configs: &[],
        guidance: 9.0,
        conditioner: |files, _, unet| match unet.time_cond_proj_dim {
            Some(_) => Ok(Conditioner::LatentUpscale),
            None => Err(Error::Invalid(format!("{}: a latent upscaler needs a UNet with a timestep condition (time_cond_proj_dim)", files.name()))),
        },
    },
];

/// SD's UNets add nothing to the time embedding (an SDXL or latent upscaler UNet in an SD
/// pipeline is refused).
fn without_added_embedding(unet: &UNetConfig) -> Result<()> {
    match (&unet.addition_embed_type, unet.time_cond_proj_dim) {
        (None, None) => Ok(()),
        (Some(kind), _) => Err(Error::Invalid(format!("the UNet adds a {kind} embedding, which this pipeline class does not give it"))),
        (None, Some(_)) => Err(Error::Invalid("the UNet takes a timestep condition (time_cond_proj_dim), which this pipeline class does not give it".into())),
    }
}

/// SDXL's conditioning, from `model_index.json`; its UNet must take it.
fn text_time(name: &str, index: &ModelIndex, unet: &UNetConfig) -> Result<Conditioner> {
    if index.requires_aesthetics_score {
        return Err(Error::Invalid(format!("{name}: an SDXL refiner (conditioned on an aesthetic score) is not a model Kiln runs; use an SDXL base or Turbo model")));
    }
    if unet.addition_embed_type.as_deref() != Some("text_time") {
        return Err(Error::Invalid(format!("{name}: an SDXL pipeline needs a UNet with addition_embed_type \"text_time\"")));
    }
    Ok(Conditioner::TextTime { force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt.unwrap_or(true) })
}

/// Config files every family has.
const SHARED_CONFIGS: [&str; 4] = [MODEL_INDEX, "scheduler/scheduler_config.json", "unet/config.json", "vae/config.json"];
/// Weight files every family has, by stem: the UNet's and the VAE's.
const SHARED_WEIGHTS: [&str; 2] = ["unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model"];

impl ModelIndex {
    /// `files`' `model_index.json`, which every diffusers pipeline has.
    pub fn read(files: &dyn ModelFiles) -> Result<Self> {
        if files.read(MODEL_INDEX)?.is_none() {
            return Err(Error::Invalid(format!("{} is not a diffusers pipeline: {MODEL_INDEX} is missing", files.name())));
        }
        json(files, MODEL_INDEX)
    }

    /// `model_index.json`'s `bytes`; `name` labels the folder in errors.
    pub fn parse(bytes: &[u8], name: &str) -> Result<Self> {
        serde_json::from_slice(bytes).map_err(|e| Error::Invalid(format!("{name}/{MODEL_INDEX} is not a diffusers pipeline's: {e}")))
    }
}

impl Family {
    /// The family of the pipeline in `files`.
    pub fn of_folder(files: &dyn ModelFiles) -> Result<&'static Family> {
        Self::of(&ModelIndex::read(files)?, &files.name())
    }

    /// The family `index` names; `name` labels the folder in errors.
    pub fn of(index: &ModelIndex, name: &str) -> Result<&'static Family> {
        FAMILIES.iter().find(|f| f.pipelines.contains(&index.class_name.as_str())).ok_or_else(|| {
            let known: Vec<_> = FAMILIES.iter().flat_map(|f| f.pipelines.iter().copied()).collect();
            Error::Invalid(format!("{name}: pipeline class {} is not one Kiln runs ({})", index.class_name, known.join(", ")))
        })
    }

    pub fn conditioner(&self, files: &dyn ModelFiles, index: &ModelIndex, unet: &UNetConfig) -> Result<Conditioner> {
        (self.conditioner)(files, index, unet)
    }

    /// Its config files: those every family has, its text encoders', its own.
    fn config_files(&self) -> Vec<String> {
        let shared = SHARED_CONFIGS.iter().map(|s| s.to_string());
        shared.chain(self.text_encoders.iter().map(TextEncoderFolders::config)).chain(self.configs.iter().map(|s| s.to_string())).collect()
    }

    /// The files its tokenizers may have (which they need, each tokenizer says).
    fn tokenizer_files(&self) -> Vec<String> {
        self.text_encoders.iter().flat_map(|e| tokenizer::FILES.map(|f| format!("{}/{f}", e.tokenizer))).collect()
    }

    /// Its weight files, by stem.
    pub fn weight_stems(&self) -> Vec<String> {
        self.text_encoders.iter().map(TextEncoderFolders::weights).chain(SHARED_WEIGHTS.map(String::from)).collect()
    }
}

/// Whether tensor `name` of weight file `stem` belongs to a component the pipeline builds each
/// time it needs it and drops after: a family's text encoder (once per prompt) and the VAE's
/// encoder (once per input image). Their GPU memory is then free while the UNet runs.
pub fn on_demand(stem: &str, name: &str) -> bool {
    let text_encoder = FAMILIES.iter().flat_map(|f| f.text_encoders).any(|e| stem == e.weights());
    text_encoder || (stem == SHARED_WEIGHTS[1] && (name.starts_with("encoder.") || name.starts_with("quant_conv.")))
}

/// The config files a model folder of any family must have: those every family has.
pub fn required_files() -> Vec<String> {
    FAMILIES[0].config_files().into_iter().filter(|path| FAMILIES.iter().all(|f| f.config_files().contains(path))).collect()
}

/// The text files some families have or a tokenizer may have: a folder is read for each, and
/// its family and tokenizer say which it needs.
pub fn optional_files() -> Vec<String> {
    let required = required_files();
    let all = distinct(FAMILIES.iter().flat_map(|f| f.config_files().into_iter().chain(f.tokenizer_files())));
    all.into_iter().filter(|path| !required.contains(path)).collect()
}

/// The weight files of every family, by stem.
pub fn weight_stems() -> Vec<String> {
    distinct(FAMILIES.iter().flat_map(Family::weight_stems))
}

/// Each item once, in the order first seen.
fn distinct(items: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut seen = Vec::new();
    for item in items {
        if !seen.contains(&item) {
            seen.push(item);
        }
    }
    seen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_the_ones_the_families_list() {
        assert_eq!(required_files(), ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "vae/config.json", "text_encoder/config.json"]);
        let tokenizer = |folder: &str| ["vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"].map(|f| format!("{folder}/{f}"));
        let sdxl = std::iter::once("text_encoder_2/config.json".to_string()).chain(tokenizer("tokenizer_2"));
        let optional: Vec<String> = tokenizer("tokenizer").into_iter().chain(sdxl).chain(["low_res_scheduler/scheduler_config.json".to_string()]).collect();
        assert_eq!(optional_files(), optional);
        assert_eq!(weight_stems(), ["text_encoder/model", "unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder_2/model"]);
    }

    #[test]
    fn text_encoders_and_the_vae_encoder_load_on_demand() {
        assert!(on_demand("text_encoder/model", "text_model.encoder.layers.0.mlp.fc1.weight"));
        assert!(on_demand("text_encoder_2/model", "text_projection.weight"));
        assert!(on_demand("vae/diffusion_pytorch_model", "encoder.conv_in.weight") && on_demand("vae/diffusion_pytorch_model", "quant_conv.weight"));
        assert!(!on_demand("vae/diffusion_pytorch_model", "decoder.conv_in.weight") && !on_demand("unet/diffusion_pytorch_model", "conv_in.weight"));
        assert!(!on_demand("unet/encoder", "encoder.conv_in.weight"));
    }

    #[test]
    fn an_unknown_pipeline_is_refused_with_the_ones_kiln_runs() {
        let parsed = ModelIndex::parse(br#"{"_class_name": "StableCascadeDecoderPipeline", "decoder": ["diffusers", "StableCascadeUNet"]}"#, "repo").unwrap();
        assert!(Family::of(&parsed, "repo").is_err());
        assert!(ModelIndex::parse(b"{}", "repo").err().unwrap().to_string().starts_with("repo/model_index.json is not a diffusers pipeline's: missing field `_class_name`"));
        let err = Family::of(&parsed, "repo").err().expect("refused").to_string();
        assert!(err.contains("StableCascadeDecoderPipeline is not one Kiln runs (StableDiffusionPipeline, "), "{err}");
        let upscaler = ModelIndex::parse(br#"{"_class_name": "StableDiffusionUpscalePipeline"}"#, "repo").unwrap();
        assert_eq!(Family::of(&upscaler, "repo").ok().map(|f| f.name), Some("the Stable Diffusion x4 upscaler"));
        let latent = ModelIndex::parse(br#"{"_class_name": "StableDiffusionLatentUpscalePipeline"}"#, "repo").unwrap();
        assert_eq!(Family::of(&latent, "repo").ok().map(|f| f.name), Some("the Stable Diffusion x2 latent upscaler"));
        let sd = ModelIndex::parse(br#"{"_class_name": "StableDiffusionPipeline"}"#, "repo").unwrap();
        let k_unet = UNetConfig { time_cond_proj_dim: Some(160), ..Default::default() };
        let err = Family::of(&sd, "repo").unwrap().conditioner(&crate::files::Folder("repo".into()), &sd, &k_unet).err().expect("refused").to_string();
        assert!(err.contains("takes a timestep condition (time_cond_proj_dim), which this pipeline class does not give it"), "{err}");
        let refiner = ModelIndex::parse(br#"{"_class_name": "StableDiffusionXLImg2ImgPipeline", "requires_aesthetics_score": true}"#, "repo").unwrap();
        let unet = UNetConfig { addition_embed_type: Some("text_time".into()), ..Default::default() };
        let err = Family::of(&refiner, "repo").unwrap().conditioner(&crate::files::Folder("repo".into()), &refiner, &unet).err().expect("refused").to_string();
        assert!(err.contains("an SDXL refiner"), "{err}");
    }
}
