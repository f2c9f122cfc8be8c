//! A safetensors file's header, read apart from its data: the page reads it from the first
//! bytes of a download (to convert tensors as they arrive) and of a stored file. Offsets are
//! `u64`, so that files over 4 GiB (SDXL's UNet) are described on wasm32 too, where the
//! `safetensors` crate's `usize` offsets cannot; the dtypes and their sizes are that crate's.
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Headers are small JSON; anything larger means the file is not safetensors.
const MAX_HEADER: u64 = 100 << 20;

/// The tensors of a file, in the order of their data. Kept by the page with a download in
/// progress, hence its field names.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
#[cfg_attr(test, derive(ts_rs::TS), ts(export, rename = "SafetensorsHeader"))]
pub struct Header {
    pub tensors: Vec<TensorEntry>,
    /// The file's length as the header implies it.
    #[cfg_attr(test, ts(as = "f64"))]
    pub file_size: u64,
}

#[derive(Debug, Serialize)]
#[cfg_attr(test, derive(ts_rs::TS), ts(export))]
pub struct TensorEntry {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Absolute byte offsets in the file.
    #[cfg_attr(test, ts(as = "f64"))]
    pub begin: u64,
    #[cfg_attr(test, ts(as = "f64"))]
    pub end: u64,
}

/// A header entry as the file states it.
#[derive(Deserialize)]
struct Stated {
    dtype: Dtype,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

/// The JSON header's length, from the file's first 8 bytes.
pub fn header_length(first8: &[u8]) -> Result<u64> {
    let bytes: [u8; 8] = first8.get(..8).and_then(|b| b.try_into().ok()).ok_or_else(|| not_safetensors("shorter than 8 bytes".into()))?;
    let n = u64::from_le_bytes(bytes);
    if !(2..=MAX_HEADER).contains(&n) {
        return Err(not_safetensors(format!("header length {n}")));
    }
    Ok(n)
}

/// Parses and checks the header `json` (the bytes after the length): every tensor's bytes
/// match its dtype and shape.
pub fn parse(json: &[u8]) -> Result<Header> {
    let entries: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(json).map_err(|_| not_safetensors("its header is not a JSON object".into()))?;
    let data_start = 8 + json.len() as u64;
    let mut tensors = Vec::with_capacity(entries.len());
    for (name, entry) in entries.into_iter().filter(|(name, _)| name != "__metadata__") {
        let stated: Stated = serde_json::from_value(entry).map_err(|e| not_safetensors(format!("tensor {name}: {e}")))?;
        let (begin, end) = stated.data_offsets;
        let bits = stated.shape.iter().try_fold(stated.dtype.bitsize() as u64, |n, &d| n.checked_mul(d as u64));
        let bytes = bits.filter(|b| b % 8 == 0).map(|b| b / 8);
        if bytes != end.checked_sub(begin) {
            return Err(Error::Invalid(format!("tensor {name}: {} bytes for {:?} {:?}", end.wrapping_sub(begin) as i64, stated.dtype, stated.shape)));
        }
        let at = |offset: u64| data_start.checked_add(offset).ok_or_else(|| not_safetensors(format!("tensor {name} lies past any file")));
        tensors.push(TensorEntry { dtype: format!("{:?}", stated.dtype), shape: stated.shape, begin: at(begin)?, end: at(end)?, name });
    }
    tensors.sort_by_key(|t| t.begin);
    let file_size = tensors.iter().map(|t| t.end).max().unwrap_or(data_start);
    Ok(Header { tensors, file_size })
}

fn not_safetensors(why: String) -> Error {
    Error::Invalid(format!("not a safetensors file ({why})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_beyond_4_gib_and_every_dtype_size_are_read() {
        let json = br#"{"__metadata__":{"format":"pt"},"b":{"dtype":"F16","shape":[3,1073741824],"data_offsets":[8,6442450952]},"a":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#;
        let header = parse(json).unwrap();
        let start = 8 + json.len() as u64;
        let names: Vec<_> = header.tensors.iter().map(|t| (t.name.as_str(), t.dtype.as_str(), t.begin - start, t.end - start)).collect();
        assert_eq!(names, [("a", "I64", 0, 8), ("b", "F16", 8, 6442450952)]);
        assert_eq!(header.file_size, start + 6442450952);
        assert_eq!(header_length(&42u64.to_le_bytes()).unwrap(), 42);
    }

    #[test]
    fn what_is_not_a_consistent_header_is_refused() {
        let err = |json: &str| parse(json.as_bytes()).err().expect("refused").to_string();
        assert!(err("[1]").contains("not a JSON object"));
        assert!(err(r#"{"x":{"dtype":"F32","shape":[2]}}"#).contains("tensor x: missing field `data_offsets`"));
        assert!(err(r#"{"x":{"dtype":"Q9","shape":[2],"data_offsets":[0,8]}}"#).contains("tensor x: unknown variant `Q9`"));
        assert_eq!(err(r#"{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#), "tensor x: 4 bytes for F32 [2]");
        assert!(err(r#"{"x":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,4]}}"#).contains("bytes for F32"));
        assert!(header_length(&[1, 0, 0, 0, 0, 0, 0, 0]).is_err() && header_length(&u64::MAX.to_le_bytes()).is_err() && header_length(&[0; 4]).is_err());
    }
}
