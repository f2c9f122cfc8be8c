//! A model's files and tensors as the worker streams them in, until [`Loader::finish`] builds
//! the pipeline. Weights arrive one tensor at a time, so wasm memory never holds a whole weight
//! file: the UNet's and the VAE decoder's go to the GPU as they come; the text encoder's and the
//! VAE encoder's wait as stored bytes until a prompt or an input image needs them
//! (`pipeline::family::on_demand`).
use std::collections::HashMap;
use std::sync::Arc;

use burn::tensor::Device;
use serde::Serialize;
use wasm_bindgen::prelude::*;

use super::js_err;
use super::model::Model;
use crate::files::MemoryFiles;
use crate::layout::FamilyFiles;
use crate::lora::{LoraFile, Loras};
use crate::pipeline::StableDiffusion;
use crate::pipeline::family::{Family, ModelIndex};
use crate::package::Manifest;
use crate::quant::Format;
use crate::safetensors_header;
use crate::weights::{Uploaded, Weights, safetensors_values};

#[wasm_bindgen]
pub struct Loader {
    device: Device,
    files: HashMap<String, Vec<u8>>,
    uploads: HashMap<String, Uploaded>,
    /// Merged into the tensors as they arrive.
    loras: Arc<Loras>,
}

impl Loader {
    pub(super) fn new(device: Device) -> Self {
        Self { device, files: HashMap::new(), uploads: HashMap::new(), loras: Arc::default() }
    }

    fn upload(&mut self, stem: String) -> &mut Uploaded {
        let loras = &self.loras;
        self.uploads.entry(stem.clone()).or_insert_with(|| Uploaded::new(&stem, &stem).with_loras(loras))
    }
}

#[wasm_bindgen]
impl Loader {
    /// A small file (config, tokenizer) by its repo path, e.g. `unet/config.json`.
    pub fn set_file(&mut self, path: String, bytes: Vec<u8>) {
        self.files.insert(path, bytes);
    }

    /// A LoRA file (`name` as in the prompt's `<lora:name:scale>`) to merge into the weights;
    /// every LoRA comes before the first tensor.
    pub fn add_lora(&mut self, name: String, bytes: Vec<u8>, scale: f32) -> Result<(), JsError> {
        let loras = Arc::get_mut(&mut self.loras).ok_or_else(|| js_err("LoRAs are added before the model's tensors"))?;
        loras.add(&LoraFile { name, bytes, scale }).map_err(js_err)
    }

    /// One tensor of a weight file, kept in its published precision. `stem` names the file
    /// without its extension (`unet/diffusion_pytorch_model`); `dtype` as in the safetensors header.
    pub fn add_tensor(&mut self, stem: String, name: String, dtype: String, shape: Vec<u32>, bytes: &[u8]) -> Result<(), JsError> {
        let shape = shape.into_iter().map(|d| d as usize).collect();
        let device = self.device.clone();
        self.upload(stem).add_safetensors(&name, &dtype, shape, bytes, Format::published(&dtype), &device).map_err(js_err)
    }

    /// One tensor stored in a Kiln format (`f32`, `f16`, `q8`, `q4`): from a package, or
    /// converted earlier by [`convert`]. Quantized tensors stay quantized on the GPU.
    pub fn add_stored(&mut self, stem: String, name: String, format: String, shape: Vec<u32>, bytes: &[u8]) -> Result<(), JsError> {
        let format = Format::from_name(&format).map_err(js_err)?;
        let shape = shape.into_iter().map(|d| d as usize).collect();
        let device = self.device.clone();
        self.upload(stem).add(&name, shape, format, bytes, &device).map_err(js_err)
    }

    /// Builds the pipeline from what was set and uploaded; `model_name` names it in messages
    /// and PNGs.
    pub fn finish(self, model_name: String) -> Result<Model, JsError> {
        let files = MemoryFiles { name: model_name, files: self.files };
        let (device, loras) = (self.device, self.loras);
        let weights: HashMap<String, Weights> = self.uploads.into_iter().map(|(stem, up)| (stem, Weights::uploaded(up, &device))).collect();
        let missing = |stem: &str| crate::Error::Invalid(format!("{}: no tensors were uploaded for {stem}", files.name));
        let pipe = StableDiffusion::assemble(&files, &|stem| weights.get(stem).cloned().ok_or_else(|| missing(stem)), &loras, &device).map_err(js_err)?;
        Ok(Model::new(pipe))
    }
}

/// The family of the diffusers pipeline whose `model_index.json` is `bytes` (`base` names the
/// repo in errors), with its weight files; fails for a pipeline the engine does not run, before
/// any weight is fetched.
#[wasm_bindgen]
pub fn pipeline_family(bytes: &[u8], base: &str) -> Result<JsValue, JsError> {
    let index = ModelIndex::parse(bytes, base).map_err(js_err)?;
    let family = Family::of(&index, base).map_err(js_err)?;
    serde_wasm_bindgen::to_value(&FamilyFiles::of(family)).map_err(js_err)
}

/// A Kiln package's `manifest.json` (`label` names it in errors), checked as `kiln` checks it
/// before any of it is used.
#[wasm_bindgen]
pub fn package_manifest(bytes: &[u8], label: &str) -> Result<JsValue, JsError> {
    let text = std::str::from_utf8(bytes).map_err(|_| js_err(format!("{label}: not UTF-8 text")))?;
    let manifest = Manifest::parse(std::path::Path::new(label), text).map_err(js_err)?;
    // Its files as a plain object, not a `Map`.
    manifest.serialize(&serde_wasm_bindgen::Serializer::json_compatible()).map_err(js_err)
}

/// The length of a safetensors file's JSON header, from its first 8 bytes.
#[wasm_bindgen]
pub fn safetensors_header_length(first8: &[u8]) -> Result<f64, JsError> {
    Ok(safetensors_header::header_length(first8).map_err(js_err)? as f64)
}

/// A safetensors file's tensors from its JSON header (the bytes after the length), checked:
/// every tensor's bytes match its dtype and shape.
#[wasm_bindgen]
pub fn safetensors_header(json: &[u8]) -> Result<JsValue, JsError> {
    serde_wasm_bindgen::to_value(&safetensors_header::parse(json).map_err(js_err)?).map_err(js_err)
}

/// Whether a safetensors entry of `dtype` is a weight the engine reads (integer buffers such as
/// CLIP's `position_ids` are not).
#[wasm_bindgen]
pub fn is_weight_dtype(dtype: String) -> bool {
    crate::weights::is_weight_dtype(&dtype)
}

/// The format a tensor is stored in when the model is kept as `format` (norms, biases,
/// embeddings and the outermost convolutions stay f16; see `quant::Format::for_tensor`).
#[wasm_bindgen]
pub fn stored_format(name: String, shape: Vec<u32>, format: String) -> Result<String, JsError> {
    let shape: Vec<usize> = shape.into_iter().map(|d| d as usize).collect();
    Ok(Format::from_name(&format).map_err(js_err)?.for_tensor(&name, &shape).name().to_owned())
}

/// A safetensors tensor (`dtype` as in its header) encoded in `stored`, the format
/// [`stored_format`] chose: the worker caches these bytes instead of the original.
#[wasm_bindgen]
pub fn convert(name: String, dtype: String, shape: Vec<u32>, bytes: &[u8], stored: String) -> Result<Vec<u8>, JsError> {
    let shape: Vec<usize> = shape.into_iter().map(|d| d as usize).collect();
    let values = safetensors_values(std::path::Path::new("weights"), &name, &dtype, &shape, bytes).map_err(js_err)?;
    Ok(Format::from_name(&stored).map_err(js_err)?.encode(&values))
}

/// The LoRAs a prompt names as `<lora:name:weight>`, as `[{ name, weight }]`.
#[wasm_bindgen]
pub fn lora_tags(prompt: &str) -> Result<JsValue, JsError> {
    let (_, tags) = crate::pipeline::prompt::lora_tags(prompt).map_err(js_err)?;
    tags.serialize(&serde_wasm_bindgen::Serializer::json_compatible()).map_err(js_err)
}
