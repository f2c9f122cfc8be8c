//! `.npy` arrays (numpy's format, read and written by the `npyz` crate) as f32 values in C
//! order: `--latents` and the noise files of the parity tests.
#[cfg(not(target_arch = "wasm32"))]
use std::path::Path;

#[cfg(not(target_arch = "wasm32"))]
use crate::error::{Error, Result};

/// An array's shape and values.
#[derive(Clone, Debug, PartialEq)]
pub struct Array {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

#[cfg(not(target_arch = "wasm32"))]
pub fn read(path: &Path) -> Result<Array> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse(&bytes).map_err(|msg| Error::Invalid(format!("{}: {msg}", path.display())))
}

/// float32 or float64 (numpy's default, narrowed), C order. The values must fill the rest of
/// the file exactly, so a header that claims more than the file holds is refused before
/// anything is allocated for it.
#[cfg(not(target_arch = "wasm32"))]
pub fn parse(bytes: &[u8]) -> std::result::Result<Array, String> {
    use npyz::{DType, NpyFile, NpyHeader, Order};
    if !bytes.starts_with(b"\x93NUMPY") {
        return Err("not a .npy file".into());
    }
    // npyz allocates the header length the file states before reading it.
    let stated = match bytes.get(6..12) {
        Some([1, _, a, b, ..]) => u16::from_le_bytes([*a, *b]) as usize,
        Some([_, _, a, b, c, d]) => u32::from_le_bytes([*a, *b, *c, *d]) as usize,
        _ => 0,
    };
    if stated > bytes.len() {
        return Err(format!("its header claims {stated} bytes, more than the file holds"));
    }
    let mut data = bytes;
    let header = NpyHeader::from_reader(&mut data).map_err(|e| format!("not a readable .npy file: {e}"))?;
    let DType::Plain(kind) = header.dtype() else { return Err("a structured array, not plain numbers".into()) };
    let width = match kind.to_string().as_str() {
        "<f4" => 4,
        "<f8" => 8,
        other => return Err(format!("values of type {other}; Kiln reads little-endian float32 or float64 ('<f4', '<f8')")),
    };
    if header.order() != Order::C {
        return Err("Fortran order is not supported; save a C-ordered copy (np.ascontiguousarray)".into());
    }
    let shape = header.shape().iter().map(|&d| usize::try_from(d).map_err(|_| format!("dimension {d} is too large"))).collect::<std::result::Result<Vec<_>, _>>()?;
    let count = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    if count.and_then(|n| n.checked_mul(width)) != Some(data.len()) {
        return Err(format!("shape {shape:?} needs {width}-byte values filling the rest of the file, which holds {} bytes", data.len()));
    }
    let file = NpyFile::with_header(header, data);
    let values = match width {
        4 => file.into_vec::<f32>(),
        _ => file.into_vec::<f64>().map(|v| v.into_iter().map(|x| x as f32).collect()),
    };
    Ok(Array { shape, values: values.map_err(|e| e.to_string())? })
}

/// Writes float32, C order, as `np.save` does.
#[cfg(not(target_arch = "wasm32"))]
pub fn write(path: &Path, array: &Array) -> Result<()> {
    use npyz::WriterBuilder;
    let write = || -> std::io::Result<()> {
        let shape: Vec<u64> = array.shape.iter().map(|&d| d as u64).collect();
        let file = std::io::BufWriter::new(std::fs::File::create(path)?);
        let mut writer = npyz::WriteOptions::new().default_dtype().shape(&shape).writer(file).begin_nd()?;
        writer.extend(array.values.iter().copied())?;
        writer.finish()
    };
    write().map_err(|e| Error::write(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `.npy` file as numpy writes it: version 1.0, the header padded to 64 bytes.
    fn npy(header: &str, data: &[u8]) -> Vec<u8> {
        let mut header = header.to_string();
        header.push_str(&" ".repeat(63 - (10 + header.len()) % 64));
        header.push('\n');
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        bytes
    }

    #[test]
    fn round_trip() {
        let dir = std::env::temp_dir().join(format!("kiln-npy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.npy");
        let array = Array { shape: vec![1, 2, 3], values: vec![0.5, -1.0, 2.0, 3.25, 4.0, -0.0] };
        write(&path, &array).unwrap();
        assert_eq!(read(&path).unwrap(), array);
    }

    #[test]
    fn reads_float64() {
        let data: Vec<u8> = [1.5f64, -2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let array = parse(&npy("{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }", &data)).unwrap();
        assert_eq!(array, Array { shape: vec![2], values: vec![1.5, -2.0] });
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        let cases = [
            ("{'descr': '<i4', 'fortran_order': False, 'shape': (1,), }", 4, "type <i4"),
            ("{'descr': '<f4', 'fortran_order': True, 'shape': (1,), }", 4, "Fortran order"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }", 4, "holds 4 bytes"),
            // 100 GB claimed by a 4-byte file: refused before allocating.
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (25000000000,), }", 4, "holds 4 bytes"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (18446744073709551615, 2), }", 4, "holds 4 bytes"),
        ];
        for (header, len, expected) in cases {
            let err = parse(&npy(header, &vec![0; len])).unwrap_err();
            assert!(err.contains(expected), "{header}: {err}");
        }
        assert!(parse(b"PK\x03\x04 not numpy").unwrap_err().contains("not a .npy file"));
        // A version 2 header that claims 2 GB.
        assert!(parse(b"\x93NUMPY\x02\x00\xff\xff\xff\x7f{}").unwrap_err().contains("more than the file holds"));
    }
}
