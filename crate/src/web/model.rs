//! A loaded model: what the page lays its controls out by, the sharp preview's decoder, and
//! [`Model::start`], which begins a [`Generation`].
use std::collections::HashMap;
use std::rc::Rc;

use wasm_bindgen::prelude::*;

use super::bench::Bench;
use super::generation::Generation;
use super::js_err;
use crate::bench::Components;
use crate::files::MemoryFiles;
use crate::messages::{GenerateRequest, ModelInfo, UpscalerInfo};
use crate::model::autoencoder_tiny::{self, AutoencoderTiny};
use crate::pipeline::StableDiffusion;
use crate::pipeline::preview;

#[wasm_bindgen]
pub struct Model {
    /// Shared with the generation in progress, which steps it.
    pipe: Rc<StableDiffusion>,
    /// The sharp preview's tiny autoencoder, when the page turned it on.
    preview_decoder: Option<Rc<AutoencoderTiny>>,
}

impl Model {
    pub(super) fn new(pipe: StableDiffusion) -> Self {
        Self { pipe: Rc::new(pipe), preview_decoder: None }
    }
}

#[wasm_bindgen]
impl Model {
    pub fn info(&self) -> Result<JsValue, JsError> {
        let info = ModelInfo {
            default_size: self.pipe.default_size(),
            size_multiple: self.pipe.size_multiple(),
            default_scheduler: self.pipe.default_scheduler().ok().map(|k| k.name().to_string()),
            upscaler: self.pipe.upscaling().map(|(factor, max_noise_level)| UpscalerInfo { factor, max_noise_level }),
        };
        serde_wasm_bindgen::to_value(&info).map_err(js_err)
    }

    /// Loads the sharp preview's decoder from a TAESD repo's `config.json` and weight file
    /// (`weight_path`, one of the names `layout().preview_decoder` lists); `name` is the repo.
    pub fn load_preview_decoder(&mut self, name: String, config: Vec<u8>, weight_path: String, weights: Vec<u8>) -> Result<(), JsError> {
        self.preview_decoder = None;
        let files = MemoryFiles { name, files: HashMap::from([(autoencoder_tiny::CONFIG.to_owned(), config), (weight_path, weights)]) };
        self.preview_decoder = Some(Rc::new(AutoencoderTiny::load(&files, self.pipe.device()).map_err(js_err)?));
        Ok(())
    }

    /// Goes back to the approximate preview, freeing the decoder.
    pub fn drop_preview_decoder(&mut self) {
        self.preview_decoder = None;
    }

    /// Validates the settings, encodes the prompt (and the images) and prepares the noise.
    pub fn start(&self, request: JsValue) -> Result<Generation, JsError> {
        let mut req: GenerateRequest = serde_wasm_bindgen::from_value(request).map_err(js_err)?;
        // The page's noise level is the x4 upscaler's: queued before the model was known, a
        // request for the latent upscaler may carry one it does not take.
        if self.pipe.upscaling().is_some_and(|(_, max_noise_level)| max_noise_level.is_none()) {
            req.noise_level = None;
        }
        let run = self.pipe.run(req.into_job().map_err(js_err)?).map_err(js_err)?;
        let misfit = self.preview_decoder.as_ref().and_then(|decoder| preview::misfit(decoder, &self.pipe));
        let decoder = self.preview_decoder.clone().filter(|_| misfit.is_none());
        Ok(Generation::new(self.pipe.clone(), decoder, run, misfit))
    }

    /// The model's components with the inputs of one step at `size`² with `batch` latents, for
    /// timing; the model is given up to them.
    pub fn bench(self, size: usize, batch: usize) -> Result<Bench, JsError> {
        let pipe = Rc::try_unwrap(self.pipe).map_err(|_| js_err("a generation still holds the model"))?;
        Ok(Bench { components: Components::from_pipeline(pipe, size, batch).map_err(js_err)? })
    }
}
