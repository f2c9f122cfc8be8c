//! SHA-256 for the page's downloads (the `sha2` crate). A weight file arrives over minutes and
//! maybe across page loads, so the digest's state is saved beside each stored chunk and
//! restored to continue, with nothing stored read back.
use sha2::digest::common::hazmat::{SerializableState, SerializedState};
use sha2::{Digest, Sha256};
use wasm_bindgen::prelude::*;

use crate::package::hex;

#[wasm_bindgen(js_name = Sha256)]
pub struct Hasher(Sha256);

#[wasm_bindgen(js_class = Sha256)]
impl Hasher {
    #[wasm_bindgen(constructor)]
    #[allow(clippy::new_without_default)]
    pub fn new() -> Hasher {
        Hasher(Sha256::new())
    }

    /// Continues from a state [`Hasher::save`] gave.
    pub fn restore(state: &[u8]) -> Result<Hasher, JsError> {
        let unreadable = || JsError::new("not a saved SHA-256 state");
        let state = SerializedState::<Sha256>::try_from(state).map_err(|_| unreadable())?;
        Sha256::deserialize(&state).map(Hasher).map_err(|_| unreadable())
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The state, to store and [`Hasher::restore`] later.
    pub fn save(&self) -> Vec<u8> {
        self.0.serialize().to_vec()
    }

    /// The digest of everything given so far, in lower-case hex; the hasher goes on.
    pub fn hex(&self) -> String {
        hex(&self.0.clone().finalize())
    }
}
