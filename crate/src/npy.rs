//! Reading and writing float32 `.npy` arrays (C order, little-endian), as numpy saves them.
use std::path::Path;

use crate::error::{Error, Result};

/// An array's shape and values.
#[derive(Clone, Debug, PartialEq)]
pub struct Array {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

pub fn read(path: &Path) -> Result<Array> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse(&bytes).map_err(|msg| Error::Invalid(format!("{}: {msg}", path.display())))
}

fn parse(bytes: &[u8]) -> std::result::Result<Array, String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not a .npy file".into());
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let header = bytes.get(start..start + header_len).ok_or("truncated header")?;
    let header = std::str::from_utf8(header).map_err(|_| "header is not text")?;
    let field = |key: &str| -> std::result::Result<&str, String> {
        let at = header.find(&format!("'{key}':")).ok_or(format!("header lacks {key}"))?;
        Ok(header[at + key.len() + 3..].trim_start())
    };
    if !field("descr")?.starts_with("'<f4'") {
        return Err("must be float32 little-endian ('<f4'); save with .astype(np.float32)".into());
    }
    if !field("fortran_order")?.starts_with("False") {
        return Err("Fortran order is not supported".into());
    }
    let shape_text = field("shape")?;
    let inner = &shape_text[1..shape_text.find(')').ok_or("malformed shape")?];
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| format!("malformed shape {inner:?}")))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let data = &bytes[start + header_len..];
    let count: usize = shape.iter().product();
    if data.len() != count * 4 {
        return Err(format!("expected {count} float32 values for shape {shape:?}, found {} bytes", data.len()));
    }
    let values = data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    Ok(Array { shape, values })
}

pub fn write(path: &Path, array: &Array) -> Result<()> {
    let dims: Vec<String> = array.shape.iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    // Pad so the data starts on a 64-byte boundary, newline-terminated, as numpy does.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in &array.values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, out).map_err(|e| Error::write(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let dir = std::env::temp_dir().join(format!("kiln-npy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.npy");
        let array = Array { shape: vec![1, 2, 3], values: vec![0.5, -1.0, 2.0, 3.25, 4.0, -0.0] };
        write(&path, &array).unwrap();
        let back = read(&path).unwrap();
        assert_eq!(back.shape, array.shape);
        assert_eq!(back.values, array.values);
    }

    #[test]
    fn rejects_other_dtypes() {
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        let header = "{'descr': '<f8', 'fortran_order': False, 'shape': (1,), }\n";
        bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&[0; 8]);
        assert!(parse(&bytes).unwrap_err().contains("float32"));
    }
}
