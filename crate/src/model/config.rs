//! Shared pieces of the diffusers config files.
use serde::Deserialize;

/// A setting given once for all blocks or as a per-block list (`attention_head_dim`, `layers_per_block`, ...).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// The value for each of `n` blocks; `None` when a list has the wrong length.
    pub fn expand(&self, n: usize) -> Option<Vec<T>> {
        match self {
            PerBlock::One(v) => Some(vec![v.clone(); n]),
            PerBlock::Many(list) if list.len() == n => Some(list.clone()),
            PerBlock::Many(_) => None,
        }
    }
}
