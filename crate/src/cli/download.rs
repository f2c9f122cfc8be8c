//! Models given to the CLI by URL: a Kiln package (its `manifest.json` answers) or a diffusers
//! repo (`…/resolve/main` on the Hugging Face hub, or any static host with the same layout).
//! Files land in a cache folder under their repo paths, each streamed to `*.part` and renamed
//! only when complete and checked (package shards: their SHA-256; JSON files: that they parse),
//! so an interrupted download or an error page is never mistaken for a finished file. Once
//! every file is there, a marker says so and later runs need no network at all.
use std::path::{Path, PathBuf};

use kiln::package::{self, Manifest, TEXT_FILES, WEIGHT_STEMS};
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

/// The body of `url`, `None` on 404.
fn get(url: &str) -> Result<Option<ureq::Body>> {
    match ureq::get(url).call() {
        Ok(response) => Ok(Some(response.into_body())),
        Err(ureq::Error::StatusCode(404)) => Ok(None),
        Err(e) => Err(Error::Invalid(format!("{url}: {e}"))),
    }
}

/// Downloads `base/path` into `dir/path` unless it is there, streaming it to disk; a path
/// ending in `.json` must parse, and `check` vets the file's bytes (when given) before they
/// count as cached. Returns whether the file exists upstream.
fn fetch(base: &str, dir: &Path, path: &str, check: Option<&dyn Fn(&[u8]) -> Result<()>>) -> Result<bool> {
    let target = dir.join(path);
    if target.exists() {
        return Ok(true);
    }
    let url = format!("{base}/{path}");
    let Some(body) = get(&url)? else { return Ok(false) };
    eprintln!("downloading {url}");
    let parent = target.parent().expect("a file path");
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let part = target.with_extension("part");
    let mut file = std::fs::File::create(&part).map_err(|e| Error::io(&part, e))?;
    // The reader fails when the connection closes before the stated length.
    std::io::copy(&mut body.into_reader(), &mut file).map_err(|e| Error::Invalid(format!("{url}: {e}")))?;
    file.sync_all().map_err(|e| Error::io(&part, e))?;
    let is_json = path.ends_with(".json");
    let vetted = || -> Result<()> {
        if !is_json && check.is_none() {
            return Ok(());
        }
        let bytes = std::fs::read(&part).map_err(|e| Error::io(&part, e))?;
        if is_json {
            serde_json::from_slice::<serde_json::Value>(&bytes).map_err(|e| Error::Invalid(format!("not JSON ({e}); the host answered with something else")))?;
        }
        check.map_or(Ok(()), |check| check(&bytes))
    };
    if let Err(e) = vetted() {
        let _ = std::fs::remove_file(&part);
        return Err(Error::Invalid(format!("{url}: {e}")));
    }
    std::fs::rename(&part, &target).map_err(|e| Error::io(&target, e))?;
    Ok(true)
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
    if fetch(base, &dir, package::MANIFEST, Some(&|bytes| parse(bytes).map(drop)))? {
        let manifest = parse(&std::fs::read(&path).map_err(|e| Error::io(&path, e))?)?;
        for shard in &manifest.shards {
            fetch(base, &dir, &shard.path, Some(&|bytes| package::verify_shard(shard, bytes)))?;
        }
    } else {
        for path in TEXT_FILES {
            fetch(base, &dir, path, None)?;
        }
        for stem in WEIGHT_STEMS {
            let [full, half] = weight_file_names(stem);
            if !fetch(base, &dir, &full, None)? && !fetch(base, &dir, &half, None)? {
                return Err(Error::Invalid(format!("{base}: neither {full} nor {half} exists")));
            }
        }
    }
    std::fs::write(dir.join(COMPLETE), b"").map_err(|e| Error::io(&dir.join(COMPLETE), e))?;
    Ok(dir)
}
