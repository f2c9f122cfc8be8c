//! The browser's entry point (wasm32 only), driven by the Web Worker through wasm-bindgen:
//! an [`Engine`] (the device) hands out a [`Loader`] per model, whose `finish` gives a
//! [`Model`], whose `start` gives a [`Generation`]. The worker downloads and caches files; the
//! engine only sees bytes.
mod bench;
mod engine;
mod generation;
mod loader;
mod model;
mod sha256;

use burn::tensor::Tensor;
use wasm_bindgen::prelude::*;

use crate::pipeline::infotext::{self, Infotext};

pub use engine::Engine;
pub use generation::Generation;
pub use loader::Loader;
pub use model::Model;

unsafe extern "C" {
    /// The linker's function that runs the static constructors (cubecl registers its IR
    /// through `inventory`).
    fn __wasm_call_ctors();
}

/// Runs once, when the worker instantiates the module. Calling the constructors here, from an
/// export, also tells the linker not to wrap every export in a call to them: it did, and each
/// crossing from JavaScript into wasm (several per GPU launch) re-ran them all, which was most
/// of a step's time in the browser.
#[wasm_bindgen(start)]
fn start() {
    // SAFETY: called once per instance, before any other export touches a registry.
    unsafe { __wasm_call_ctors() };
    console_error_panic_hook::set_once();
    if log::set_logger(&ConsoleLog).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
}

/// Sends the engine's log errors and warnings to the console. A kernel the browser refuses to
/// compile is reported only there (cubecl logs it), and the worker fails the run on it.
struct ConsoleLog;

impl log::Log for ConsoleLog {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::Level::Warn
    }

    fn log(&self, record: &log::Record) {
        let text = JsValue::from(record.args().to_string());
        match record.level() {
            log::Level::Error => web_sys::console::error_1(&text),
            _ => web_sys::console::warn_1(&text),
        }
    }

    fn flush(&self) {}
}

/// The engine's facts about a model's files and the settings' defaults and limits
/// ([`crate::layout::Layout`]): the page's only source of them.
#[wasm_bindgen]
pub fn layout() -> Result<JsValue, JsError> {
    serde_wasm_bindgen::to_value(&crate::layout::Layout::get()).map_err(js_err)
}

fn js_err(e: impl std::fmt::Display) -> JsError {
    JsError::new(&e.to_string())
}

/// A failure of a run in progress as a JavaScript `Error`, named `NonFinite` for NaN or Inf
/// (the model or the settings are at fault, not the engine).
fn run_error(e: crate::Error) -> JsValue {
    let error = js_sys::Error::new(&e.to_string());
    if matches!(e, crate::Error::NonFinite(_)) {
        error.set_name("NonFinite");
    }
    error.into()
}

/// The settings a PNG's `parameters` text carries (Kiln's or Automatic1111's), as
/// `infotext::Settings`; fails when the file is no PNG or carries no such text.
#[wasm_bindgen]
pub fn png_info(bytes: &[u8]) -> Result<JsValue, JsError> {
    let text = infotext::read_png(bytes).map_err(js_err)?.ok_or_else(|| js_err("this PNG carries no generation parameters (Kiln and Automatic1111 write them)"))?;
    serde_wasm_bindgen::to_value(&Infotext::parse(&text).settings()).map_err(js_err)
}

/// Resolves to a tensor's values as a `Float32Array`.
fn read_f32(tensor: Tensor<1>) -> js_sys::Promise {
    wasm_bindgen_futures::future_to_promise(async move { Ok(js_sys::Float32Array::from(read_back(tensor).await?.as_slice()).into()) })
}

/// A tensor's values on the host, once the device has computed them.
async fn read_back(tensor: Tensor<1>) -> Result<Vec<f32>, JsValue> {
    let data = tensor.into_data_async().await.map_err(|e| JsValue::from(js_err(crate::Error::gpu(e))))?;
    data.try_to_vec::<f32>().map_err(|e| JsValue::from(js_err(format!("{e:?}"))))
}
