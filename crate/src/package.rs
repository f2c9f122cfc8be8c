//! Kiln packages: a diffusers pipeline with its weights converted to one [`Format`], cut into
//! shards a browser can fetch, verify and cache one at a time.
//!
//! A package folder holds `manifest.json` and `shard-00000.bin`, `shard-00001.bin`, ... The
//! tensors' stored bytes (see [`crate::quant`]) are written back to back into one stream, and
//! the stream is cut into shards of [`SHARD_SIZE`] bytes (the last one shorter). A tensor lives
//! at `offset` in shard `shard` and runs on for `length` bytes, into the following shards when
//! it is longer than what is left of its own. The manifest embeds the pipeline's config and
//! tokenizer files as text, so the shards are all there is to download besides it, and
//! records each shard's length and SHA-256: a shard is used only once both match.
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::Device;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::files::{MemoryFiles, ModelFiles};
use crate::layout::text_files;
use crate::lora::Loras;
use crate::pipeline::family::Family;
use crate::quant::{BLOCK, Format};
use crate::weights::{Uploaded, Weights, for_each_tensor};

pub const MANIFEST: &str = "manifest.json";
/// The package layout version this build reads and writes.
pub const VERSION: u32 = 1;
/// Shard length: small enough for one fetch and one IndexedDB record.
pub const SHARD_SIZE: usize = 64 << 20;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(ts_rs::TS), ts(export, rename = "PackageManifest"))]
pub struct Manifest {
    /// The layout version ([`VERSION`]).
    pub kiln_package: u32,
    /// The source pipeline's short name (PNG metadata).
    pub name: String,
    /// The format asked for; each tensor's own is in [`TensorEntry::format`].
    pub format: Format,
    /// Values per quantization block; scales are f16.
    pub block_size: usize,
    pub shard_size: usize,
    /// Repo path → text (configs, tokenizer).
    #[cfg_attr(test, ts(type = "Record<string, string>"))]
    pub files: BTreeMap<String, String>,
    pub shards: Vec<ShardEntry>,
    pub tensors: Vec<TensorEntry>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(ts_rs::TS), ts(export, rename = "PackageShard"))]
pub struct ShardEntry {
    pub path: String,
    pub length: usize,
    /// Lower-case hex.
    pub sha256: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(ts_rs::TS), ts(export, rename = "PackageTensor"))]
pub struct TensorEntry {
    /// The weight file's stem (`unet/diffusion_pytorch_model`).
    pub file: String,
    /// The diffusers name inside that file.
    pub name: String,
    pub shape: Vec<usize>,
    /// The dtype in the source safetensors (`F32`, `F16`, `BF16`).
    pub source_dtype: String,
    pub format: Format,
    pub shard: usize,
    pub offset: usize,
    pub length: usize,
}

impl Manifest {
    pub fn parse(label: &Path, text: &str) -> Result<Self> {
        let manifest: Manifest = serde_json::from_str(text).map_err(|e| Error::Config { path: label.to_owned(), msg: e.to_string() })?;
        if manifest.kiln_package != VERSION {
            return Err(Error::Invalid(format!("{}: package version {} is not {VERSION}, the one this Kiln reads", label.display(), manifest.kiln_package)));
        }
        if manifest.block_size != BLOCK || manifest.shard_size == 0 {
            return Err(Error::Invalid(format!("{}: block size {} / shard size {} are not Kiln's", label.display(), manifest.block_size, manifest.shard_size)));
        }
        // Shards are files beside the manifest: a path elsewhere would make a download write,
        // or a load read, outside the package's folder.
        let plain = |p: &str| !p.is_empty() && p != "." && p != ".." && !p.contains(['/', '\\', ':']);
        if let Some(shard) = manifest.shards.iter().find(|s| !plain(&s.path)) {
            return Err(Error::Invalid(format!("{}: shard path {:?} is not a file name beside the manifest", label.display(), shard.path)));
        }
        if let Some(t) = manifest.tensors.iter().find(|t| t.shard >= manifest.shards.len()) {
            return Err(Error::Invalid(format!("{}: tensor `{}` of {} is in shard {}, but there are {}", label.display(), t.name, t.file, t.shard, manifest.shards.len())));
        }
        // Offsets count from the start of a shard of `shard_size` bytes; only the last is shorter.
        let full = manifest.shards.split_last().map_or(&[][..], |(_, full)| full);
        if let Some(shard) = full.iter().find(|s| s.length != manifest.shard_size) {
            return Err(Error::Invalid(format!("{}: shard {} has {} bytes; every shard but the last has {}", label.display(), shard.path, shard.length, manifest.shard_size)));
        }
        Ok(manifest)
    }

    /// Bytes of all shards together.
    pub fn total_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.length as u64).fold(0, u64::saturating_add)
    }

    /// The tensors with where each starts in the stream of shards, in stream order.
    fn stream_order(&self, label: &Path) -> Result<Vec<(usize, &TensorEntry)>> {
        let mut located = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            let start = t.shard.checked_mul(self.shard_size).and_then(|s| s.checked_add(t.offset)).filter(|s| s.checked_add(t.length).is_some());
            let start = start.ok_or_else(|| Error::Invalid(format!("{}: tensor `{}` of {} lies past the end of the shards", label.display(), t.name, t.file)))?;
            located.push((start, t));
        }
        located.sort_by_key(|&(start, _)| start);
        Ok(located)
    }
}

/// Lower-case hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Lower-case hex of a digest.
pub fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks a shard's bytes against its manifest entry.
pub fn verify_shard(entry: &ShardEntry, bytes: &[u8]) -> Result<()> {
    check_shard(entry, bytes.len(), &sha256_hex(bytes))
}

/// [`verify_shard`] on a shard's length and SHA-256 (hex), when they were taken as it streamed.
pub fn check_shard(entry: &ShardEntry, length: usize, found: &str) -> Result<()> {
    if length != entry.length {
        return Err(Error::Invalid(format!("{}: {length} bytes, the manifest says {}; the package is incomplete", entry.path, entry.length)));
    }
    if found != entry.sha256 {
        return Err(Error::Invalid(format!("{}: SHA-256 {found} does not match the manifest's {}; the shard is corrupt", entry.path, entry.sha256)));
    }
    Ok(())
}

/// Writes the stream of stored tensors as shards, hashing each as it closes.
struct ShardWriter {
    dir: PathBuf,
    current: Vec<u8>,
    shards: Vec<ShardEntry>,
}

impl ShardWriter {
    /// Appends `bytes`; returns the shard and offset where they start.
    fn append(&mut self, mut bytes: &[u8]) -> Result<(usize, usize)> {
        let start = (self.shards.len(), self.current.len());
        while !bytes.is_empty() {
            let take = bytes.len().min(SHARD_SIZE - self.current.len());
            self.current.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.current.len() == SHARD_SIZE {
                self.close()?;
            }
        }
        // A tensor that filled its shard exactly starts there, not in the next one.
        Ok(start)
    }

    fn close(&mut self) -> Result<()> {
        let path = format!("shard-{:05}.bin", self.shards.len());
        let full = self.dir.join(&path);
        std::fs::write(&full, &self.current).map_err(|e| Error::write(&full, e))?;
        self.shards.push(ShardEntry { path, length: self.current.len(), sha256: sha256_hex(&self.current) });
        self.current.clear();
        Ok(())
    }
}

/// Converts the diffusers pipeline in `files` to a package in `out` (created if needed).
pub fn pack(files: &dyn ModelFiles, format: Format, out: &Path) -> Result<Manifest> {
    let family = Family::of_folder(files)?;
    std::fs::create_dir_all(out).map_err(|e| Error::write(out, e))?;
    let mut embedded = BTreeMap::new();
    for path in text_files() {
        if files.read(&path)?.is_some() {
            embedded.insert(path.clone(), files.require_text(&path)?);
        }
    }
    let mut writer = ShardWriter { dir: out.to_owned(), current: Vec::new(), shards: Vec::new() };
    let mut tensors = Vec::new();
    for stem in family.weight_stems() {
        for_each_tensor(files, &stem, format, |name, source_dtype, shape, values| {
            let stored = format.for_tensor(name, shape);
            let encoded = stored.encode(&values);
            let (shard, offset) = writer.append(&encoded)?;
            let (name, source_dtype, shape) = (name.to_owned(), source_dtype.to_owned(), shape.to_vec());
            tensors.push(TensorEntry { file: stem.to_owned(), name, shape, source_dtype, format: stored, shard, offset, length: encoded.len() });
            Ok(())
        })?;
    }
    if !writer.current.is_empty() {
        writer.close()?;
    }
    let manifest = Manifest {
        kiln_package: VERSION,
        name: crate::files::short_name(files),
        format,
        block_size: BLOCK,
        shard_size: SHARD_SIZE,
        files: embedded,
        shards: writer.shards,
        tensors,
    };
    let path = out.join(MANIFEST);
    let mut file = std::fs::File::create(&path).map_err(|e| Error::write(&path, e))?;
    serde_json::to_writer_pretty(&mut file, &manifest).map_err(|e| Error::Invalid(e.to_string()))?;
    file.write_all(b"\n").map_err(|e| Error::write(&path, e))?;
    Ok(manifest)
}

/// A package read back: its text files and, per weight file stem, the tensors on the device.
pub struct Loaded {
    pub format: Format,
    pub files: MemoryFiles,
    pub weights: HashMap<String, Weights>,
}

/// Reads the package in `files` shard by shard: each is verified before any tensor in it is
/// built, and the host holds only the shard being read (and the start of a tensor that runs on
/// into the next).
pub fn load(files: &dyn ModelFiles, loras: &Arc<Loras>, device: &Device) -> Result<Loaded> {
    let label = files.label(MANIFEST);
    let manifest = Manifest::parse(&label, &files.require_text(MANIFEST)?)?;
    let mut pending = manifest.stream_order(&label)?.into_iter().peekable();
    let mut uploads: HashMap<String, Uploaded> = HashMap::new();
    // The stream's bytes from `held_from` on that a tensor still waiting needs.
    let (mut held, mut held_from) = (Vec::new(), 0);
    for shard in &manifest.shards {
        let bytes = files.require(&shard.path)?;
        verify_shard(shard, &bytes).map_err(|e| Error::Invalid(format!("{}/{e}", files.name())))?;
        if held.is_empty() {
            held = bytes;
        } else {
            held.extend_from_slice(&bytes);
        }
        let arrived = held_from + held.len();
        while let Some((start, t)) = pending.next_if(|(start, t)| start + t.length <= arrived) {
            let upload = uploads.entry(t.file.clone()).or_insert_with(|| Uploaded::new(&t.file, files.label(&t.file)).with_loras(loras));
            upload.add(&t.name, t.shape.clone(), t.format, &held[start - held_from..start - held_from + t.length], device)?;
        }
        let keep_from = pending.peek().map_or(arrived, |&(start, _)| start.min(arrived));
        held.drain(..keep_from - held_from);
        held_from = keep_from;
    }
    if let Some((_, t)) = pending.next() {
        return Err(Error::Invalid(format!("{}: tensor `{}` of {} lies past the end of the shards", label.display(), t.name, t.file)));
    }
    let weights = uploads.into_iter().map(|(stem, up)| (stem, Weights::uploaded(up, device))).collect();
    let text = manifest.files.into_iter().map(|(path, text)| (path, text.into_bytes())).collect();
    Ok(Loaded { format: manifest.format, files: MemoryFiles { name: manifest.name, files: text }, weights })
}
