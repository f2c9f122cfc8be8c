//! Weights from safetensors files, addressed by diffusers' own tensor names.
//!
//! A [`Weights`] is a view into one file under a name prefix, so each module loads its
//! fields as `w.pp("conv_in").tensor("weight", [..])`: loading is a mapping of names,
//! never a translation table.
//!
//! [`Weights::random`] serves any name with random values of the asked shape, so the
//! same loading code builds full-size models for benchmarks without a download.
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use burn::tensor::{Device, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors, tensor::Metadata};

use crate::error::{Error, Result};
use crate::files::ModelFiles;
use crate::quant::{self, Format};

struct File {
    path: PathBuf,
    bytes: Vec<u8>,
    /// Offset of the tensor data block (8-byte length + JSON header).
    data_start: usize,
    metadata: Metadata,
}

#[derive(Default)]
struct RandomStats {
    values: AtomicU64,
    stored_bytes: AtomicU64,
}

#[derive(Clone)]
enum Source {
    File(Arc<File>),
    /// Counts what was handed out; the value count is also the state of the random stream.
    Random(Arc<RandomStats>),
    /// Tensors already on the device, uploaded one by one (the browser streams them from its
    /// cache; a package is loaded the same way).
    Uploaded(Arc<Uploaded>),
}

/// Tensors by name, each with its shape: on the device as a matrix in its stored format (see
/// [`Weights::matrix`]); on the host as f32 for norms and biases (the layers hold them in f32),
/// embedding tables (read row by row; see `clip.rs`) and anything larger than one GPU binding
/// may be; or on the host as stored, for the components built only while they run (see
/// [`on_demand`]).
pub struct Uploaded {
    label: PathBuf,
    stem: String,
    tensors: HashMap<String, (Vec<usize>, Stored)>,
}

enum Stored {
    Device(Tensor<2>),
    Host(Vec<f32>),
    Packed(Format, Vec<u8>),
}

/// Whether tensor `name` of weight file `stem` belongs to a component the pipeline builds each
/// time it needs it and drops after: the text encoder (once per prompt) and the VAE's encoder
/// (once per input image). Their GPU memory is then free while the UNet runs.
pub fn on_demand(stem: &str, name: &str) -> bool {
    stem.starts_with("text_encoder/") || (stem.starts_with("vae/") && (name.starts_with("encoder.") || name.starts_with("quant_conv.")))
}

/// WebGPU's default `maxStorageBufferBindingSize`, and lavapipe's: no tensor may be larger.
pub const MAX_BINDING_BYTES: usize = 128 << 20;

/// A tensor's shape as the matrix a [`Weights::matrix`] holds: `[shape[0], the rest]`.
fn matrix_shape(shape: &[usize]) -> [usize; 2] {
    match shape {
        [] => [1, 1],
        [n] => [1, *n],
        [rows, rest @ ..] => [*rows, rest.iter().product()],
    }
}

impl Uploaded {
    fn lookup(&self, name: &str, shape: &[usize]) -> Result<&Stored> {
        let (found, stored) = self.tensors.get(name).ok_or_else(|| Error::MissingTensor { path: self.label.clone(), name: name.to_owned() })?;
        if found != shape {
            return Err(Error::ShapeMismatch { path: self.label.clone(), name: name.to_owned(), expected: shape.to_vec(), found: found.clone() });
        }
        Ok(stored)
    }

    /// Tensors of the weight file `stem` (`unet/diffusion_pytorch_model`); `label` names it in messages.
    pub fn new(stem: &str, label: impl Into<PathBuf>) -> Self {
        Self { label: label.into(), stem: stem.to_owned(), tensors: HashMap::new() }
    }

    /// Adds one tensor stored as `format` and puts it where it is used from (quantized ones
    /// stay so).
    pub fn add(&mut self, name: &str, shape: Vec<usize>, format: Format, bytes: &[u8], device: &Device) -> Result<()> {
        let n: usize = shape.iter().product();
        let bad = |msg: String| Error::Safetensors { path: self.label.clone(), msg: format!("tensor `{name}`: {msg}") };
        if bytes.len() != format.stored_len(n) {
            return Err(bad(format!("{} bytes for shape {shape:?} in {}", bytes.len(), format.name())));
        }
        let stored = if on_demand(&self.stem, name) {
            Stored::Packed(format, bytes.to_vec())
        } else if shape.len() < 2 || name.ends_with("embedding.weight") || n * 4 > MAX_BINDING_BYTES {
            Stored::Host(format.decode(bytes, n)?)
        } else {
            Stored::Device(quant::matrix(format, bytes, matrix_shape(&shape), device).map_err(|e| bad(e.to_string()))?)
        };
        self.tensors.insert(name.to_owned(), (shape, stored));
        Ok(())
    }

    /// Adds one safetensors entry (`dtype` as the header spells it), converted to `format`.
    pub fn add_safetensors(&mut self, name: &str, dtype: &str, shape: Vec<usize>, raw: &[u8], format: Format, device: &Device) -> Result<()> {
        let values = safetensors_values(&self.label, name, dtype, &shape, raw)?;
        self.add_converted(name, shape, &values, format, device)
    }

    /// Every tensor of the published weight file `stem`, each converted to `format` once.
    pub fn from_file(files: &dyn ModelFiles, stem: &str, format: Format, device: &Device) -> Result<Self> {
        let mut up = Self::new(stem, files.label(stem));
        for_each_tensor(files, stem, |name, _, shape, values| up.add_converted(name, shape.to_vec(), &values, format, device))?;
        Ok(up)
    }

    fn add_converted(&mut self, name: &str, shape: Vec<usize>, values: &[f32], format: Format, device: &Device) -> Result<()> {
        let stored = format.for_tensor(name, &shape);
        self.add(name, shape, stored, &stored.encode(values), device)
    }
}

/// Calls `f` with the name, source dtype, shape and f32 values of every tensor of the published
/// weight file `stem`, in name order.
pub fn for_each_tensor(files: &dyn ModelFiles, stem: &str, mut f: impl FnMut(&str, &str, &[usize], Vec<f32>) -> Result<()>) -> Result<()> {
    let (path, bytes) = read_weight_file(files, stem)?;
    let label = files.label(&path);
    let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::Safetensors { path: label.clone(), msg: e.to_string() })?;
    let mut names = st.names();
    names.sort();
    for name in names {
        let view = st.tensor(name).map_err(|e| Error::Safetensors { path: label.clone(), msg: e.to_string() })?;
        let dtype = format!("{:?}", view.dtype());
        f(name, &dtype, view.shape(), safetensors_values(&label, name, &dtype, view.shape(), view.data())?)?;
    }
    Ok(())
}

/// The values of one safetensors entry whose header says `dtype` (`F32`, `F16` or `BF16`).
pub fn safetensors_values(path: &std::path::Path, name: &str, dtype: &str, shape: &[usize], raw: &[u8]) -> Result<Vec<f32>> {
    let unsupported = || Error::UnsupportedDtype { path: path.to_owned(), name: name.into(), dtype: dtype.into() };
    let (dtype, width) = match dtype {
        "F32" => (Dtype::F32, 4),
        "F16" => (Dtype::F16, 2),
        "BF16" => (Dtype::BF16, 2),
        _ => return Err(unsupported()),
    };
    if raw.len() != shape.iter().product::<usize>() * width {
        return Err(Error::Safetensors { path: path.to_owned(), msg: format!("tensor `{name}` has {} bytes for shape {shape:?} in {dtype:?}", raw.len()) });
    }
    to_f32(dtype, raw).ok_or_else(unsupported)
}

#[derive(Clone)]
pub struct Weights {
    source: Source,
    prefix: String,
    device: Device,
    /// The format full-precision sources are converted to as they load (see [`Format::for_tensor`]).
    format: Format,
}

impl Weights {
    /// Parses a safetensors buffer; `path` is only used in messages.
    pub fn from_bytes(path: impl Into<PathBuf>, bytes: Vec<u8>, device: &Device) -> Result<Self> {
        let path = path.into();
        let (header_len, metadata) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| Error::Safetensors { path: path.clone(), msg: e.to_string() })?;
        let file = File { path, bytes, data_start: 8 + header_len, metadata };
        Ok(Self::with_source(Source::File(Arc::new(file)), device))
    }

    fn with_source(source: Source, device: &Device) -> Self {
        Self { source, prefix: String::new(), device: device.clone(), format: Format::F32 }
    }

    /// Random weights: norm scales 1, biases 0, other tensors uniform with variance
    /// 1/fan_in, which keeps activations in range through a deep network.
    pub fn random(device: &Device) -> Self {
        Self::with_source(Source::Random(Arc::default()), device)
    }

    pub fn uploaded(uploaded: Uploaded, device: &Device) -> Self {
        Self::with_source(Source::Uploaded(Arc::new(uploaded)), device)
    }

    /// The same weights converted to `format` as they load, exactly as `kiln pack` stores them.
    /// Uploaded tensors keep the format they were uploaded in.
    pub fn converted(self, format: Format) -> Self {
        Self { format, ..self }
    }

    /// What a random source handed out so far: the parameter count of what it built, and the
    /// bytes a package of it would store in the format it was converted to.
    pub fn random_stats(&self) -> (u64, u64) {
        match &self.source {
            Source::Random(stats) => (stats.values.load(Ordering::Relaxed), stats.stored_bytes.load(Ordering::Relaxed)),
            Source::File(_) | Source::Uploaded(_) => (0, 0),
        }
    }

    /// Opens `<stem>.safetensors`, or the `.fp16.safetensors` variant when it is the only one.
    pub fn open(files: &dyn ModelFiles, stem: &str, device: &Device) -> Result<Self> {
        let (path, bytes) = read_weight_file(files, stem)?;
        Self::from_bytes(files.label(&path), bytes, device)
    }

    /// The view under `prefix.name`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) };
        Self { prefix, ..self.clone() }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn contains(&self, name: &str) -> bool {
        match &self.source {
            Source::File(file) => file.metadata.info(&self.full_name(name)).is_some(),
            Source::Random(_) => false,
            Source::Uploaded(up) => up.tensors.contains_key(&self.full_name(name)),
        }
    }

    fn full_name(&self, name: &str) -> String {
        if self.prefix.is_empty() { name.to_owned() } else { format!("{}.{name}", self.prefix) }
    }

    /// The tensor `name` as f32 values on the host, checked against `shape`.
    pub fn values(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let full = self.full_name(name);
        let stored = self.format.for_tensor(&full, shape);
        let values = self.source_values(name, &full, shape)?;
        Ok(if stored == Format::F32 { values } else { stored.decode(&stored.encode(&values), values.len())? })
    }

    /// The values as the source holds them, before any conversion.
    fn source_values(&self, name: &str, full: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let file = match &self.source {
            Source::File(file) => file,
            Source::Random(stats) => {
                let n = shape.iter().product::<usize>();
                stats.stored_bytes.fetch_add(self.format.for_tensor(full, shape).stored_len(n) as u64, Ordering::Relaxed);
                return Ok(random_values(&stats.values, name, shape));
            }
            Source::Uploaded(up) => {
                return match up.lookup(full, shape)? {
                    Stored::Host(values) => Ok(values.clone()),
                    Stored::Packed(format, bytes) => format.decode(bytes, shape.iter().product()),
                    Stored::Device(_) => Err(Error::Invalid(format!("{}: `{full}` ({shape:?}) lives on the device", up.label.display()))),
                };
            }
        };
        let info = file.metadata.info(full).ok_or_else(|| Error::MissingTensor { path: file.path.clone(), name: full.to_owned() })?;
        if info.shape != shape {
            return Err(Error::ShapeMismatch { path: file.path.clone(), name: full.to_owned(), expected: shape.to_vec(), found: info.shape.clone() });
        }
        let (start, end) = info.data_offsets;
        let raw = &file.bytes[file.data_start + start..file.data_start + end];
        to_f32(info.dtype, raw).ok_or_else(|| Error::UnsupportedDtype { path: file.path.clone(), name: full.to_owned(), dtype: format!("{:?}", info.dtype) })
    }

    /// The tensor `name` on the device in f32, checked against `shape`.
    pub fn tensor<const D: usize>(&self, name: &str, shape: [usize; D]) -> Result<Tensor<D>> {
        if let Source::Uploaded(up) = &self.source {
            if let Stored::Device(matrix) = up.lookup(&self.full_name(name), &shape)? {
                return Ok(quant::to_f32(matrix.clone()).reshape(shape));
            }
        }
        let values = self.values(name, &shape)?;
        Ok(Tensor::from_data(TensorData::new(values, shape), &self.device))
    }

    /// A layer's weight `name` of `shape` as the matrix `[shape[0], the rest]`, kept quantized
    /// on the device when it is stored (or converted) so; [`quant::to_f32`] gives it in f32.
    pub fn matrix(&self, name: &str, shape: &[usize]) -> Result<Tensor<2>> {
        let full = self.full_name(name);
        if let Source::Uploaded(up) = &self.source {
            return match up.lookup(&full, shape)? {
                Stored::Device(matrix) => Ok(matrix.clone()),
                Stored::Host(values) => Ok(Tensor::from_data(TensorData::new(values.clone(), matrix_shape(shape)), &self.device)),
                Stored::Packed(format, bytes) => quant::matrix(*format, bytes, matrix_shape(shape), &self.device),
            };
        }
        let values = self.source_values(name, &full, shape)?;
        let stored = self.format.for_tensor(&full, shape);
        let bytes = stored.encode(&values);
        quant::matrix(stored, &bytes, matrix_shape(shape), &self.device)
    }
}

/// The files a weight file `stem` may be published as, in order of preference.
pub fn weight_file_names(stem: &str) -> [String; 2] {
    [format!("{stem}.safetensors"), format!("{stem}.fp16.safetensors")]
}

/// The path and bytes of the first of [`weight_file_names`] that `files` has.
fn read_weight_file(files: &dyn ModelFiles, stem: &str) -> Result<(String, Vec<u8>)> {
    for path in weight_file_names(stem) {
        if let Some(bytes) = files.read(&path)? {
            return Ok((path, bytes));
        }
    }
    Err(Error::Invalid(format!("{}: neither {stem}.safetensors nor {stem}.fp16.safetensors exists", files.name())))
}

/// Little-endian F32/F16/BF16 bytes as f32; `None` for other dtypes.
fn to_f32(dtype: Dtype, raw: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::F16 => raw.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::BF16 => raw.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        _ => return None,
    })
}

fn random_values(count: &AtomicU64, name: &str, shape: &[usize]) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let start = count.fetch_add(n as u64, Ordering::Relaxed);
    if shape.len() == 1 {
        return vec![if name == "weight" { 1.0 } else { 0.0 }; n];
    }
    let fan_in: usize = shape[1..].iter().product();
    let bound = (3.0 / fan_in as f32).sqrt();
    // splitmix64 over the global index: cheap, and different for every tensor.
    (0..n as u64)
        .map(|i| {
            let mut z = (start + i).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * bound
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    fn file_with(name: &str, dtype: Dtype, shape: Vec<usize>, data: &[u8]) -> Weights {
        let view = TensorView::new(dtype, shape, data).unwrap();
        let bytes = safetensors::serialize([(name, view)], None).unwrap();
        Weights::from_bytes("unet/test.safetensors", bytes, &Device::flex()).unwrap()
    }

    #[test]
    fn reads_f16_and_bf16_as_f32() {
        let halfs: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect();
        assert_eq!(file_with("a.weight", Dtype::F16, vec![2], &halfs).pp("a").values("weight", &[2]).unwrap(), vec![1.5, -2.0]);
        let bf: Vec<u8> = [0.25f32, 3.0].iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect();
        assert_eq!(file_with("b", Dtype::BF16, vec![2], &bf).values("b", &[2]).unwrap(), vec![0.25, 3.0]);
    }

    #[test]
    fn errors_name_the_file_tensor_and_shapes() {
        let w = file_with("conv_in.weight", Dtype::F32, vec![2, 2], &[0; 16]);
        let err = w.pp("conv_in").values("weight", &[2, 3]).unwrap_err().to_string();
        assert_eq!(err, "unet/test.safetensors: tensor `conv_in.weight` has shape [2, 2], expected [2, 3]");
        let err = w.pp("conv_out").values("weight", &[2]).unwrap_err().to_string();
        assert_eq!(err, "unet/test.safetensors: tensor `conv_out.weight` is missing");
    }

    #[test]
    fn malformed_files_are_refused() {
        let err = Weights::from_bytes("vae/x.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}".to_vec(), &Device::flex());
        assert!(err.err().unwrap().to_string().starts_with("vae/x.safetensors: not a valid safetensors file"));
    }

    #[test]
    fn prefers_full_precision_and_falls_back_to_fp16() {
        let dir = std::env::temp_dir().join(format!("kiln-weights-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = crate::files::Folder(dir.clone());
        let write = |name: &str, dtype: Dtype, data: &[u8]| {
            let view = TensorView::new(dtype, vec![1], data).unwrap();
            std::fs::write(dir.join(name), safetensors::serialize([("x", view)], None).unwrap()).unwrap();
        };
        write("model.fp16.safetensors", Dtype::F16, &half::f16::from_f32(2.0).to_le_bytes());
        assert_eq!(Weights::open(&files, "model", &Device::flex()).unwrap().values("x", &[1]).unwrap(), vec![2.0]);
        write("model.safetensors", Dtype::F32, &1.0f32.to_le_bytes());
        assert_eq!(Weights::open(&files, "model", &Device::flex()).unwrap().values("x", &[1]).unwrap(), vec![1.0]);
        let err = Weights::open(&files, "other", &Device::flex()).err().unwrap().to_string();
        assert!(err.contains("neither other.safetensors nor other.fp16.safetensors"), "{err}");
    }
}
