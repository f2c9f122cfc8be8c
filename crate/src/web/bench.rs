//! The calls of [`Components`] for `scripts/bench-web`, which times them (and counts their GPU
//! dispatches) in JavaScript, as `kiln bench` times them natively.
use wasm_bindgen::prelude::*;

use super::{js_err, read_f32};
use crate::bench::Components;

#[wasm_bindgen]
pub struct Bench {
    pub(super) components: Components,
}

#[wasm_bindgen]
impl Bench {
    /// Runs `component` (`text_encoder`, `unet` or `vae_decode`) once; resolves when the device
    /// has finished it (one value read back, as `kiln bench` waits).
    pub fn call(&self, component: String) -> Result<js_sys::Promise, JsError> {
        let probe = match component.as_str() {
            "text_encoder" => self.components.text_encoder_call().flatten::<1>(0, 2),
            "unet" => self.components.unet_call().flatten::<1>(0, 3),
            "vae_decode" => self.components.vae_decode().flatten::<1>(0, 3),
            other => return Err(js_err(format!("no component {other:?}"))),
        };
        Ok(read_f32(probe.narrow(0, 0, 1)))
    }

    /// The timestep of every timed UNet call.
    pub fn timestep() -> f64 {
        crate::bench::TIMESTEP
    }

    /// The UNet call's input latents, flattened (the ONNX Runtime peer's `sample`).
    pub fn sample(&self) -> Vec<f32> {
        self.components.sample.clone()
    }

    pub fn sample_shape(&self) -> Vec<u32> {
        self.components.sample_shape.iter().map(|&d| d as u32).collect()
    }

    /// The UNet call's text states, flattened (`encoder_hidden_states`).
    pub fn context(&self) -> Vec<f32> {
        self.components.context.clone()
    }

    pub fn context_shape(&self) -> Vec<u32> {
        self.components.context_shape.iter().map(|&d| d as u32).collect()
    }

    /// The UNet call's output values, for the check against ONNX Runtime.
    pub fn unet_output(&self) -> js_sys::Promise {
        read_f32(self.components.unet_call().flatten::<1>(0, 3))
    }
}
