//! Models given to the CLI by URL: a Kiln package (its `manifest.json` answers) or a diffusers
//! repo (`…/resolve/main` on the Hugging Face hub, or any static host with the same layout).
//! Files land in a cache folder under their repo paths, each written to `*.part` and renamed
//! only when complete (and, for package shards, only when its SHA-256 matches), so an
//! interrupted download is never mistaken for a finished one; cached files are reused.
use std::io::Write;
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

/// Downloads `base/path` into `dir/path` unless it is there; `check` vets the bytes before
/// they count as cached. Returns whether the file exists upstream.
fn fetch(base: &str, dir: &Path, path: &str, check: &dyn Fn(&[u8]) -> Result<()>) -> Result<bool> {
    let target = dir.join(path);
    if target.exists() {
        return Ok(true);
    }
    let url = format!("{base}/{path}");
    let Some(body) = get(&url)? else { return Ok(false) };
    eprintln!("downloading {url}");
    let bytes = body.into_with_config().limit(u64::MAX).read_to_vec().map_err(|e| Error::Invalid(format!("{url}: {e}")))?;
    check(&bytes).map_err(|e| Error::Invalid(format!("{url}: {e}")))?;
    let parent = target.parent().expect("a file path");
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let part = target.with_extension("part");
    let mut file = std::fs::File::create(&part).map_err(|e| Error::io(&part, e))?;
    file.write_all(&bytes).and_then(|()| file.sync_all()).map_err(|e| Error::io(&part, e))?;
    std::fs::rename(&part, &target).map_err(|e| Error::io(&target, e))?;
    Ok(true)
}

/// Fetches the model at `url` (what is not cached yet) and returns its local folder.
pub fn model(url: &str) -> Result<PathBuf> {
    let base = url.trim_end_matches('/');
    let dir = cache_dir(base);
    let anything = |_: &[u8]| Ok(());
    if fetch(base, &dir, package::MANIFEST, &anything)? {
        let path = dir.join(package::MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let manifest = Manifest::parse(&path, &text)?;
        for shard in &manifest.shards {
            fetch(base, &dir, &shard.path, &|bytes| package::verify_shard(shard, bytes))?;
        }
        return Ok(dir);
    }
    for path in TEXT_FILES {
        fetch(base, &dir, path, &anything)?;
    }
    for stem in WEIGHT_STEMS {
        let [full, half] = weight_file_names(stem);
        if !fetch(base, &dir, &full, &anything)? && !fetch(base, &dir, &half, &anything)? {
            return Err(Error::Invalid(format!("{base}: neither {full} nor {half} exists")));
        }
    }
    Ok(dir)
}
