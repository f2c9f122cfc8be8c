//! Where a model's files come from: a folder natively, the browser's cache in the web app.
//! The engine asks for files by their path inside a diffusers repo (`unet/config.json`).
use std::collections::HashMap;
use std::path::PathBuf;

use crate::error::{Error, Result};

pub trait ModelFiles {
    /// The file's bytes, `None` when the repo has no such file.
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>>;

    /// Where the model came from, for messages and PNG metadata.
    fn name(&self) -> String;

    /// A file the model cannot do without.
    fn require(&self, path: &str) -> Result<Vec<u8>> {
        self.read(path)?.ok_or_else(|| Error::Invalid(format!("{}: {path} is missing", self.name())))
    }

    fn require_text(&self, path: &str) -> Result<String> {
        String::from_utf8(self.require(path)?).map_err(|_| Error::Invalid(format!("{}: {path} is not UTF-8 text", self.name())))
    }

    /// `path` as shown in messages.
    fn label(&self, path: &str) -> PathBuf {
        PathBuf::from(self.name()).join(path)
    }
}

/// Parses a JSON config, naming the file on error.
pub fn json<T: serde::de::DeserializeOwned>(files: &dyn ModelFiles, path: &str) -> Result<T> {
    serde_json::from_str(&files.require_text(path)?).map_err(|e| Error::Config { path: files.label(path), msg: e.to_string() })
}

/// The model's short name for metadata: the last part of its folder or URL.
pub fn short_name(files: &dyn ModelFiles) -> String {
    let name = files.name();
    let trimmed = name.trim_end_matches('/');
    let trimmed = trimmed.strip_suffix("/resolve/main").unwrap_or(trimmed);
    trimmed.rsplit(['/', '\\']).next().unwrap_or(trimmed).to_owned()
}

/// A diffusers folder on disk.
pub struct Folder(pub PathBuf);

impl ModelFiles for Folder {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>> {
        let full = self.0.join(path);
        match std::fs::read(&full) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(full, e)),
        }
    }

    fn name(&self) -> String {
        self.0.display().to_string()
    }
}

/// Files held in memory, by repo path (the browser hands configs and tokenizer files over this way).
pub struct MemoryFiles {
    pub name: String,
    pub files: HashMap<String, Vec<u8>>,
}

impl ModelFiles for MemoryFiles {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.files.get(path).cloned())
    }

    fn name(&self) -> String {
        self.name.clone()
    }
}
