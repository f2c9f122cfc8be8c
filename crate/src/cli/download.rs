//! Models given to the CLI by URL: a Kiln package (its `manifest.json` answers) or a diffusers
//! repo (`…/resolve/main` on the Hugging Face hub, or any static host with the same layout).
//! Files land in a cache folder under their repo paths, each streamed to `*.part` and renamed
//! only when complete and checked (package shards: their length and SHA-256, hashed as they
//! stream; JSON files: that they parse),
//! so an interrupted download or an error page is never mistaken for a finished file; weight
//! files must be as long as their safetensors header says, which catches a body cut short by a
//! host that sent no length, and have the SHA-256 the host states (`host.rs`). A host that
//! stops sending is given up on after [`stall_limit`]. Once every file is there, a marker
//! says so and later runs need no network at all.
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::host::{self, stall_limit};
use kiln::files::Folder;
use kiln::layout::text_files;
use kiln::package::{self, Manifest};
use kiln::pipeline::family::Family;
use kiln::safetensors_header;
use kiln::weights::weight_file_names;
use kiln::{Error, Result};

/// Where `url`'s files are cached: `$XDG_CACHE_HOME/kiln/models/<host>/<path…>`, so the
/// folder's name is the model's (`…/sd-turbo/resolve/main` is named `sd-turbo`).
fn cache_dir(url: &str) -> PathBuf {
    let mut dir = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("kiln/models");
    let path = url.split_once("://").map_or(url, |(_, rest)| rest);
    for segment in path.split('/').filter(|s| !s.is_empty() && *s != "..") {
        dir.push(segment.chars().map(|c| if c.is_ascii_alphanumeric() || ".-_".contains(c) { c } else { '_' }).collect::<String>());
    }
    dir
}

/// What a file must pass before it counts as cached, besides the SHA-256 its host states.
enum Vet<'a> {
    /// What its name says: a `.json` file must parse, a `.safetensors` one must be whole.
    ByName,
    /// A whole safetensors file, whatever its name.
    Safetensors,
    /// Its bytes must pass this (the package manifest must parse).
    Bytes(&'a dyn Fn(&[u8]) -> Result<()>),
    /// A package shard: the length and SHA-256 its manifest entry states, the digest taken as
    /// it streamed to disk (no second read).
    Shard(&'a package::ShardEntry),
}

/// Downloads `base/path` into `dir/path` unless it is there, streaming it to disk, and keeps it
/// once it passes `vet`. Returns whether the file exists upstream.
fn fetch(base: &str, dir: &Path, path: &str, vet: Vet) -> Result<bool> {
    let target = dir.join(path);
    if target.exists() {
        return Ok(true);
    }
    let url = format!("{base}/{path}");
    let Some(answer) = host::get(&url)? else { return Ok(false) };
    eprintln!("downloading {url}");
    let parent = target.parent().expect("a file path");
    std::fs::create_dir_all(parent).map_err(|e| Error::write(parent, e))?;
    let part = target.with_extension("part");
    let file = std::fs::File::create(&part).map_err(|e| Error::write(&part, e))?;
    let digest = copy_watched(answer.body, file, &url)?;
    let vetted = || -> Result<()> {
        if answer.sha256.as_ref().is_some_and(|stated| *stated != digest) {
            return Err(Error::Invalid("its SHA-256 differs from the one the host states; run again to download it anew".into()));
        }
        if let Vet::Shard(shard) = vet {
            let length = std::fs::metadata(&part).map_err(|e| Error::io(&part, e))?.len();
            return package::check_shard(shard, length as usize, &digest);
        }
        if path.ends_with(".safetensors") || matches!(vet, Vet::Safetensors) {
            check_length(&part)?;
        }
        if !path.ends_with(".json") && matches!(vet, Vet::ByName | Vet::Safetensors) {
            return Ok(());
        }
        let bytes = std::fs::read(&part).map_err(|e| Error::io(&part, e))?;
        if path.ends_with(".json") {
            serde_json::from_slice::<serde_json::Value>(&bytes).map_err(|e| Error::Invalid(format!("not JSON ({e}); the host answered with something else")))?;
        }
        match vet {
            Vet::Bytes(check) => check(&bytes),
            _ => Ok(()),
        }
    };
    if let Err(e) = vetted() {
        let _ = std::fs::remove_file(&part);
        return Err(Error::Invalid(format!("{url}: {e}")));
    }
    std::fs::rename(&part, &target).map_err(|e| Error::write(&target, e))?;
    Ok(true)
}

/// Streams `body` into `file` on a thread of its own, failing when no byte has arrived for
/// [`stall_limit`] (a blocked read cannot be interrupted; the command exits soon after).
/// Returns the body's SHA-256 in hex.
fn copy_watched(body: ureq::Body, mut file: std::fs::File, url: &str) -> Result<String> {
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let copy = std::thread::spawn(move || -> std::io::Result<String> {
        // The reader fails when the connection closes before a stated length.
        let (mut reader, mut buffer, mut hasher) = (body.into_reader(), vec![0u8; 1 << 16], Sha256::new());
        loop {
            let n = reader.read(&mut buffer)?;
            if n == 0 {
                file.sync_all()?;
                return Ok(package::hex(&hasher.finalize()));
            }
            file.write_all(&buffer[..n])?;
            hasher.update(&buffer[..n]);
            counter.fetch_add(n as u64, Ordering::Relaxed);
        }
    });
    let limit = stall_limit();
    let (mut seen, mut since) = (0, Instant::now());
    while !copy.is_finished() {
        std::thread::sleep(Duration::from_millis(50));
        let now = received.load(Ordering::Relaxed);
        if now != seen {
            (seen, since) = (now, Instant::now());
        } else if since.elapsed() > limit {
            return Err(Error::Invalid(format!(
                "{url}: the host sent nothing for {} s after {seen} bytes; check the connection and run again (the download resumes from the start of this file)",
                limit.as_secs()
            )));
        }
    }
    copy.join().expect("the copy does not panic").map_err(|e| Error::Invalid(format!("{url}: {e}")))
}

/// A safetensors file must be exactly as long as its header says (8 bytes of length, the
/// header, then the data up to its last tensor's end).
fn check_length(path: &Path) -> Result<()> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let bad = |why: String| Error::Invalid(format!("not a complete safetensors file: {why}"));
    let mut first8 = [0u8; 8];
    file.read_exact(&mut first8).map_err(|_| bad(format!("only {size} bytes")))?;
    let n = safetensors_header::header_length(&first8)?;
    if n > size - 8 {
        return Err(bad(format!("its header claims {n} bytes, the file has {size}")));
    }
    let mut json = vec![0u8; n as usize];
    file.read_exact(&mut json).map_err(|e| Error::io(path, e))?;
    let expected = safetensors_header::parse(&json)?.file_size;
    if size != expected {
        return Err(bad(format!("{size} bytes arrived of the {expected} its header describes; the host cut it short")));
    }
    Ok(())
}

/// Fetches the single file at `url` (a LoRA) unless it is cached, and returns its local path.
/// It must be a whole safetensors file, whatever its name.
pub fn file(url: &str) -> Result<PathBuf> {
    let (base, name) =
        url.rsplit_once('/').filter(|(base, name)| !name.is_empty() && base.contains("://")).ok_or_else(|| Error::Invalid(format!("{url}: the URL names no file")))?;
    let dir = cache_dir(base);
    if !fetch(base, &dir, name, Vet::Safetensors)? {
        return Err(Error::Invalid(format!("{url}: the host has no such file")));
    }
    Ok(dir.join(name))
}

/// Written once every file of the model is cached, so later runs ask the host nothing.
const COMPLETE: &str = ".kiln-complete";

/// Fetches the model at `url` (what is not cached yet) and returns its local folder.
pub fn model(url: &str) -> Result<PathBuf> {
    let base = url.trim_end_matches('/');
    let dir = cache_dir(base);
    if dir.join(COMPLETE).exists() {
        return Ok(dir);
    }
    let path = dir.join(package::MANIFEST);
    let parse = |bytes: &[u8]| Manifest::parse(&path, &String::from_utf8_lossy(bytes));
    if fetch(base, &dir, package::MANIFEST, Vet::Bytes(&|bytes| parse(bytes).map(drop)))? {
        let manifest = parse(&std::fs::read(&path).map_err(|e| Error::io(&path, e))?)?;
        for shard in &manifest.shards {
            fetch(base, &dir, &shard.path, Vet::Shard(shard))?;
        }
    } else {
        for path in text_files() {
            fetch(base, &dir, &path, Vet::ByName)?;
        }
        for stem in Family::of_folder(&Folder(dir.clone()))?.weight_stems() {
            let [preferred, other] = weight_file_names(&stem);
            if !fetch(base, &dir, &preferred, Vet::ByName)? && !fetch(base, &dir, &other, Vet::ByName)? {
                return Err(Error::Invalid(format!("{base}: neither {preferred} nor {other} exists")));
            }
        }
    }
    std::fs::write(dir.join(COMPLETE), b"").map_err(|e| Error::write(&dir.join(COMPLETE), e))?;
    Ok(dir)
}
