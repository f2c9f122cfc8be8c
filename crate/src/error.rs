//! One error type for the engine: every message names the file or value at fault.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },

    #[error("{path}: malformed JSON config: {msg}")]
    Config { path: PathBuf, msg: String },

    #[error("{path}: not a valid safetensors file: {msg}")]
    Safetensors { path: PathBuf, msg: String },

    #[error("{path}: tensor `{name}` is missing")]
    MissingTensor { path: PathBuf, name: String },

    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch { path: PathBuf, name: String, expected: Vec<usize>, found: Vec<usize> },

    #[error("{path}: tensor `{name}` has dtype {dtype}; only F32, F16 and BF16 are supported")]
    UnsupportedDtype { path: PathBuf, name: String, dtype: String },

    #[error("{0}")]
    Scheduler(#[from] crate::schedulers::SchedulerError),

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// NaN or Inf where a number must be (damaged weights or inputs, an overflow); the text
    /// says where it appeared. Never shown as a black picture.
    #[error("non-finite values (NaN or Inf) {0}")]
    NonFinite(String),

    /// A request the model cannot serve (bad size, bad latents shape, ...).
    #[error("{0}")]
    Invalid(String),

    /// The device failed a run: a buffer it refused, out of memory, or lost.
    #[error("the GPU did not finish the run: {0}")]
    Gpu(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    pub fn write(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Write { path: path.into(), source }
    }

    /// A failed read-back of burn's, as its innermost cause: the full text nests every
    /// operation the failure skipped, with backtraces.
    pub fn gpu(e: impl std::fmt::Display) -> Self {
        let text = e.to_string();
        let cause = text.rsplit("Caused by:").next().and_then(|c| c.lines().map(str::trim).find(|l| !l.is_empty()));
        Error::Gpu(cause.unwrap_or("no reason given").to_owned())
    }
}
