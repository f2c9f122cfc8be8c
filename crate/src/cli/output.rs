//! The image a command writes: its path is claimed before any work, so a bad `--out` fails at
//! once rather than after the generation, and the file appears whole or not at all.
use std::path::{Path, PathBuf};

use kiln::{Error, Result};

/// A claimed output path; dropped uncommitted (a failed run), it leaves nothing behind.
pub struct Output {
    path: PathBuf,
    /// Where the bytes are written before they are renamed onto `path`.
    partial: PathBuf,
}

impl Output {
    /// Checks that `path` can be written by creating its partial file beside it.
    pub fn claim(path: &Path) -> Result<Self> {
        if path.is_dir() {
            return Err(Error::Invalid(format!("--out {} is a directory; give a file name such as {}", path.display(), path.join("image.png").display())));
        }
        let name = path.file_name().ok_or_else(|| Error::Invalid(format!("--out {} names no file", path.display())))?;
        let partial = path.with_file_name(format!(".{}.partial", name.to_string_lossy()));
        std::fs::write(&partial, b"").map_err(|e| Error::write(path, e))?;
        Ok(Self { path: path.to_owned(), partial })
    }

    /// Writes `bytes` and puts them in place in one rename.
    pub fn commit(self, bytes: &[u8]) -> Result<()> {
        std::fs::write(&self.partial, bytes).map_err(|e| Error::write(&self.path, e))?;
        std::fs::rename(&self.partial, &self.path).map_err(|e| Error::write(&self.path, e))
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        // Gone already after a commit.
        let _ = std::fs::remove_file(&self.partial);
    }
}
