//! One generation in progress: the worker steps it, waits on it (with a preview), and
//! finishes it into a PNG. Freeing it cancels it.
use std::rc::Rc;

use wasm_bindgen::prelude::*;

use super::{js_err, read_back, run_error};
use crate::messages::{Finished, Latents, Started};
use crate::model::autoencoder_tiny::AutoencoderTiny;
use crate::pipeline::preview::Previewer;
use crate::pipeline::{Run, StableDiffusion};

#[wasm_bindgen]
pub struct Generation {
    pipe: Rc<StableDiffusion>,
    /// The sharp preview's decoder, when one is loaded and fits the model.
    preview_decoder: Option<Rc<AutoencoderTiny>>,
    run: Run,
    /// Why the loaded preview decoder does not fit the model, if it does not.
    misfit: Option<String>,
}

impl Generation {
    pub(super) fn new(pipe: Rc<StableDiffusion>, preview_decoder: Option<Rc<AutoencoderTiny>>, run: Run, misfit: Option<String>) -> Self {
        Self { pipe, preview_decoder, run, misfit }
    }
}

#[wasm_bindgen]
impl Generation {
    /// Its UNet calls in all, the output size, and what the user should know (a resized input,
    /// a preview decoder that does not fit the model).
    pub fn info(&self) -> Result<JsValue, JsError> {
        let (width, height) = self.run.size();
        let warnings = self.run.warnings().iter().cloned().chain(self.misfit.clone()).collect();
        serde_wasm_bindgen::to_value(&Started { total: self.run.total(), width, height, warnings }).map_err(js_err)
    }

    /// Queues one denoising step; returns how many are done.
    pub fn step(&mut self) -> Result<usize, JsError> {
        self.run.step(&self.pipe).map_err(js_err)?;
        Ok(self.run.done())
    }

    pub fn finished(&self) -> bool {
        self.run.finished()
    }

    /// Resolves once the GPU has caught up with the queued steps (an 8-byte readback), so
    /// progress is real and a cancel lands within one step; rejects on NaN or Inf. With
    /// `preview`, resolves to the image as it forms (`{ width, height, rgba }`: by the sharp
    /// preview's decoder when there is one, else one pixel per latent pixel when the latent
    /// space has RGB factors), else to `undefined`.
    pub fn wait(&self, preview: bool) -> js_sys::Promise {
        let previewer = match &self.preview_decoder {
            Some(decoder) => Previewer::Tiny(decoder),
            None => Previewer::Approx,
        };
        let probe = self.run.probe(preview.then_some(previewer));
        wasm_bindgen_futures::future_to_promise(async move {
            let values = read_back(probe.tensor.clone()).await?;
            probe.check(&values).map_err(run_error)?;
            match probe.preview(&values) {
                Some(preview) => serde_wasm_bindgen::to_value(&preview).map_err(|e| js_err(e).into()),
                None => Ok(JsValue::UNDEFINED),
            }
        })
    }

    /// Decodes the image and resolves to its PNG bytes, carrying the generation parameters,
    /// and the latents it was decoded from (`Finished`).
    pub fn finish(self) -> js_sys::Promise {
        let image = self.run.decode(&self.pipe);
        let latents = self.run.latents();
        let (pixels, shape) = (image.dims()[0], latents.dims().to_vec());
        let both = burn::tensor::Tensor::cat(vec![image, latents.flatten::<1>(0, 3)], 0);
        let scaling_factor = self.pipe.vae.config.scaling_factor;
        let run = self.run;
        wasm_bindgen_futures::future_to_promise(async move {
            let mut values = read_back(both).await?;
            let latents = Latents { shape, values: values.split_off(pixels), scaling_factor };
            let png = run.png(&values).map_err(run_error)?;
            serde_wasm_bindgen::to_value(&Finished { png, latents }).map_err(|e| js_err(e).into())
        })
    }
}
