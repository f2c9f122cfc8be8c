//! What a model's files are and how a request may be set: the facts the CLI, the engine and
//! the page share, written once. The page gets them from the wasm module (`layout()` in
//! `web/mod.rs`, read into the bundle at build time by `scripts/web/bundle.mjs`).
use serde::Serialize;

use crate::messages::ModeName;
use crate::model::autoencoder_tiny;
use crate::package::MANIFEST;
use crate::pipeline::{family, img2img, inpaint, upscale};
use crate::quant::Format;
use crate::pipeline::resize::ResizeMode;
use crate::schedulers::SchedulerKind;
use crate::weights::weight_file_names;

/// Every text file the engine reads, required ones first ([`family`] lists them per family).
pub fn text_files() -> impl Iterator<Item = String> {
    family::required_files().into_iter().chain(family::optional_files())
}

/// The weight files of a pipeline, without extension (the names the engine uploads them under).
pub fn weight_stems() -> Vec<String> {
    family::weight_stems()
}

/// The config file of the component whose weight file is `stem` (`unet/config.json`).
fn component_config(stem: &str) -> String {
    format!("{}/config.json", stem.split('/').next().unwrap_or(stem))
}

/// The facts the page needs, in one object.
#[derive(Serialize)]
#[cfg_attr(test, derive(ts_rs::TS), ts(export))]
pub struct Layout {
    /// Text files every model folder has.
    pub required_files: Vec<String>,
    /// Text files a folder may have: its family and tokenizer say which it needs.
    pub optional_files: Vec<String>,
    /// Each weight file's names, preferred first, for every family (a repo has its family's:
    /// [`FamilyFiles`]).
    pub weight_files: Vec<WeightFile>,
    /// A Kiln package's manifest, by which a package is told from a diffusers repo.
    pub manifest: &'static str,
    /// A diffusers repo's pipeline description, read first: it names the pipeline's family.
    pub model_index: &'static str,
    /// The files of a TAESD repo, the sharp live preview's decoder.
    pub preview_decoder: PreviewDecoderFiles,
    /// How a repo's weights may be kept: `original` (as published), or converted.
    pub precisions: Vec<&'static str>,
    /// The modes, as requests name them, in the order the page lists them.
    pub modes: Vec<ModeName>,
    pub schedulers: Vec<&'static str>,
    pub default_strength: Strengths,
    pub default_noise_level: usize,
    /// The x4 upscaler's highest noise level unless its `model_index.json` says otherwise.
    pub max_noise_level: usize,
    pub max_mask_blur: f32,
    /// How an editing mode's image is fitted to the output size, the default first.
    pub resize_modes: Vec<Named>,
}

/// What the page needs of a repo's family, once its `model_index.json` names it.
#[derive(Serialize)]
#[cfg_attr(test, derive(ts_rs::TS), ts(export))]
pub struct FamilyFiles {
    pub name: &'static str,
    /// Its weight files' stems, each one of [`Layout::weight_files`].
    pub weight_stems: Vec<String>,
}

impl FamilyFiles {
    pub fn of(family: &family::Family) -> Self {
        Self { name: family.name, weight_stems: family.weight_stems() }
    }
}

/// A choice as the engine takes it (`name`) and as A1111 labels it.
#[derive(Serialize)]
#[cfg_attr(test, derive(ts_rs::TS), ts(export))]
pub struct Named {
    pub name: &'static str,
    pub label: &'static str,
}

#[derive(Serialize)]
#[cfg_attr(test, derive(ts_rs::TS), ts(export))]
pub struct WeightFile {
    pub stem: String,
    pub files: [String; 2],
    /// Its component's config file: a repo has the weight file exactly when it has this.
    pub config: String,
}

#[derive(Serialize)]
#[cfg_attr(test, derive(ts_rs::TS), ts(export))]
pub struct PreviewDecoderFiles {
    pub config: &'static str,
    /// The weight file's names, preferred first.
    pub weight_files: [String; 2],
}

/// diffusers' default strength per editing mode.
#[derive(Serialize)]
#[cfg_attr(test, derive(ts_rs::TS), ts(export))]
pub struct Strengths {
    pub img2img: f64,
    pub inpaint: f64,
}

impl Layout {
    pub fn get() -> Self {
        Layout {
            required_files: family::required_files(),
            optional_files: family::optional_files(),
            weight_files: weight_stems().into_iter().map(|stem| WeightFile { files: weight_file_names(&stem), config: component_config(&stem), stem }).collect(),
            manifest: MANIFEST,
            model_index: family::MODEL_INDEX,
            preview_decoder: PreviewDecoderFiles { config: autoencoder_tiny::CONFIG, weight_files: weight_file_names(autoencoder_tiny::WEIGHT_STEM) },
            // Converting to f32 would only widen f16 weights, which the GPU does anyway.
            precisions: std::iter::once("original").chain(Format::ALL.into_iter().filter(|&f| f != Format::F32).map(Format::name)).collect(),
            modes: ModeName::ALL.into(),
            schedulers: SchedulerKind::ALL.iter().map(|k| k.name()).collect(),
            default_strength: Strengths { img2img: img2img::DEFAULT_STRENGTH, inpaint: inpaint::DEFAULT_STRENGTH },
            default_noise_level: upscale::DEFAULT_NOISE_LEVEL,
            max_noise_level: upscale::DEFAULT_MAX_NOISE_LEVEL,
            max_mask_blur: inpaint::MAX_MASK_BLUR,
            resize_modes: ResizeMode::ALL.map(|m| Named { name: m.name(), label: m.label() }).into(),
        }
    }
}
