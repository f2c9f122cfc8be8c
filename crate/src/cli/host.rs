//! Asking a model host for one file, as the Hugging Face hub answers: a weight file is a
//! redirect to a CDN whose `X-Linked-Etag` states the file's SHA-256; a busy host answers 429
//! or 503 with `Retry-After`; a host that sends nothing is given up on after [`stall_limit`].
use std::time::Duration;

use kiln::{Error, Result};

/// A file's body, and the SHA-256 the host states for it.
pub struct Answer {
    pub body: ureq::Body,
    pub sha256: Option<String>,
}

/// Redirects followed per file (the hub needs one).
const MAX_REDIRECTS: usize = 5;
/// Times a busy host is asked again per file.
const BUSY_RETRIES: u32 = 3;
/// The longest `Retry-After` waited for; a host that asks for more is reported at once.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// How long a host may send nothing (to connect, to answer, in the middle of a body) before
/// the download fails: 30 s, or `KILN_STALL_SECONDS` (the tests' stalled host).
pub fn stall_limit() -> Duration {
    let seconds = std::env::var("KILN_STALL_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
    Duration::from_secs(seconds)
}

/// The file at `url`, `None` on 404; following redirects, and asking a busy host again.
pub fn get(url: &str) -> Result<Option<Answer>> {
    let limit = Some(stall_limit());
    let agent: ureq::Agent =
        ureq::Agent::config_builder().timeout_connect(limit).timeout_recv_response(limit).max_redirects(0).http_status_as_error(false).build().into();
    let (mut at, mut sha256, mut redirects, mut busy) = (url.to_owned(), None, 0, 0);
    loop {
        let response = agent.get(&at).call().map_err(|e| Error::Invalid(format!("{url}: {e}")))?;
        let status = response.status().as_u16();
        let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        // The hub states the SHA-256 on the redirect; the CDN's own ETag is another digest.
        sha256 = sha256.or_else(|| stated_sha256(header("x-linked-etag").as_deref()).or_else(|| stated_sha256(header("etag").as_deref())));
        match status {
            200 => return Ok(Some(Answer { body: response.into_body(), sha256 })),
            404 => return Ok(None),
            301 | 302 | 303 | 307 | 308 if redirects < MAX_REDIRECTS => {
                let location = header("location").ok_or_else(|| Error::Invalid(format!("{url}: HTTP {status} without a Location")))?;
                at = resolve(&at, &location);
                redirects += 1;
            }
            429 | 503 if busy < BUSY_RETRIES => {
                let wait = retry_after(header("retry-after").as_deref(), busy);
                if wait > MAX_RETRY_AFTER {
                    return Err(Error::Invalid(format!("{url}: the host is busy (HTTP {status}) and asks to wait {} s; run again later", wait.as_secs())));
                }
                eprintln!("{url}: the host is busy (HTTP {status}); asking again in {} s", wait.as_secs());
                std::thread::sleep(wait);
                busy += 1;
            }
            401 | 403 => {
                return Err(Error::Invalid(format!(
                    "{url}: the host refuses access (HTTP {status}); a gated or private repo must be downloaded by hand and given as a folder"
                )));
            }
            _ => return Err(Error::Invalid(format!("{url}: the host answered HTTP {status}; run again later"))),
        }
    }
}

/// A digest header's SHA-256 (`"…"` or `W/"…"` around 64 hex digits), lowercased.
fn stated_sha256(value: Option<&str>) -> Option<String> {
    let value = value?.trim_start_matches("W/").trim_matches('"');
    (value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit())).then(|| value.to_ascii_lowercase())
}

/// `Retry-After` in seconds; a date or no header waits 1, 2, 4 s as retries go on.
fn retry_after(value: Option<&str>, retry: u32) -> Duration {
    Duration::from_secs(value.and_then(|v| v.trim().parse().ok()).unwrap_or(1 << retry))
}

/// A `Location` against the URL it came from: absolute, or a path on the same origin.
fn resolve(from: &str, location: &str) -> String {
    if location.contains("://") {
        return location.to_owned();
    }
    let origin_end = from.find("://").map_or(0, |i| i + 3);
    let origin = &from[..from[origin_end..].find('/').map_or(from.len(), |i| origin_end + i)];
    if location.starts_with('/') {
        format!("{origin}{location}")
    } else {
        format!("{}/{location}", &from[..from.rfind('/').unwrap_or(from.len())])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_locations_and_waits_are_read_as_hosts_write_them() {
        let sha = "ab".repeat(32);
        assert_eq!(stated_sha256(Some(&format!("\"{sha}\""))), Some(sha.clone()));
        assert_eq!(stated_sha256(Some(&format!("W/\"{}\"", sha.to_uppercase()))), Some(sha));
        assert_eq!(stated_sha256(Some("\"0123456789abcdef0123456789abcdef01234567\"")), None, "a git blob id is no SHA-256");
        assert_eq!(resolve("http://h:1/a/b/c", "https://cdn/x"), "https://cdn/x");
        assert_eq!(resolve("http://h:1/a/b/c", "/x/y"), "http://h:1/x/y");
        assert_eq!(resolve("http://h:1/a/b/c", "d"), "http://h:1/a/b/d");
        assert_eq!(retry_after(Some(" 7 "), 0), Duration::from_secs(7));
        assert_eq!(retry_after(Some("Wed, 21 Oct 2026 07:28:00 GMT"), 2), Duration::from_secs(4));
    }
}
