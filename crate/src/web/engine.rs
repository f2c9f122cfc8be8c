//! The device the worker creates once: it hands out a [`Loader`] per model.
use burn::tensor::Device;
use wasm_bindgen::prelude::*;

use super::bench::Bench;
use super::js_err;
use super::loader::Loader;
use crate::bench::Components;

#[wasm_bindgen]
pub struct Engine {
    device: Device,
}

#[wasm_bindgen]
impl Engine {
    /// The engine on `backend`: `webgpu` (burn's wgpu runtime; fails with the adapter's message
    /// when there is none) or `cpu` (burn's flex backend in this thread).
    pub async fn create(backend: String) -> Result<Engine, JsError> {
        let device = match backend.as_str() {
            "webgpu" => Device::wgpu_options().init_async().await.map_err(|e| js_err(format!("WebGPU could not be initialised: {e}")))?,
            "cpu" => Device::flex(),
            other => return Err(js_err(format!("unknown backend {other:?} (webgpu or cpu)"))),
        };
        Ok(Engine { device })
    }

    /// An empty loader for one model on this engine's device.
    pub fn loader(&self) -> Loader {
        Loader::new(self.device.clone())
    }

    /// A full-size published architecture (`sd15`, `sd-turbo`) with random weights, for timing.
    pub fn bench_random(&self, preset: String, size: usize, batch: usize) -> Result<Bench, JsError> {
        Ok(Bench { components: Components::random(&preset, size, batch, &self.device).map_err(js_err)?.0 })
    }
}
