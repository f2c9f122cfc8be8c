//! Weights addressed by diffusers' own tensor names.
//!
//! A [`Weights`] is a view into one weight file's tensors under a name prefix, so each module
//! loads its fields as `w.pp("conv_in").tensor("weight", [..])`: loading is a mapping of names,
//! never a translation table. Every source (a published safetensors file, a package, the
//! browser's cache) is uploaded tensor by tensor into an [`Uploaded`] first.
//!
//! [`Weights::random`] serves any name with random values of the asked shape, so the
//! same loading code builds full-size models for benchmarks without a download.
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use burn::tensor::{Device, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};
use crate::files::ModelFiles;
use crate::lora::Loras;
use crate::quant::{self, Format};

#[derive(Default)]
struct RandomStats {
    values: AtomicU64,
    stored_bytes: AtomicU64,
}

#[derive(Clone)]
enum Source {
    /// Counts what was handed out; the value count is also the state of the random stream.
    Random(Arc<RandomStats>),
    /// Tensors uploaded one by one: from a published file, a package, or the browser's cache.
    Uploaded(Arc<Uploaded>),
}

/// Tensors by name, each with its shape: on the device as a matrix in its stored format (see
/// [`Weights::matrix`]); on the host as f32 for norms and biases (the layers hold them in f32),
/// embedding tables (read row by row; see `clip.rs`) and anything larger than one GPU binding
/// may be; or on the host as stored, for the components built only while they run (see
/// [`crate::pipeline::family::on_demand`]).
pub struct Uploaded {
    label: PathBuf,
    stem: String,
    tensors: HashMap<String, (Vec<usize>, Stored)>,
    /// Merged into the weights they change as those are added.
    loras: Arc<Loras>,
}

enum Stored {
    Device(Tensor<2>),
    Host(Vec<f32>),
    Packed(Format, Vec<u8>),
}

/// How many values a tensor of `shape` holds, when they can be addressed as f32 bytes. A
/// header may claim any shape: the product of its non-zero dimensions must fit too, since
/// code that views a tensor as a matrix multiplies parts of the shape.
pub fn element_count(shape: &[usize]) -> Option<usize> {
    let nonzero = shape.iter().filter(|&&d| d > 0).try_fold(1usize, |n, &d| n.checked_mul(d))?;
    nonzero.checked_mul(4)?;
    Some(if shape.contains(&0) { 0 } else { nonzero })
}

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
        Self { label: label.into(), stem: stem.to_owned(), tensors: HashMap::new(), loras: Arc::default() }
    }

    /// The same, with `loras` merged into the tensors added from now on.
    pub fn with_loras(self, loras: &Arc<Loras>) -> Self {
        Self { loras: loras.clone(), ..self }
    }

    /// Adds one tensor stored as `format` and puts it where it is used from (quantized ones
    /// stay so). A tensor a LoRA changes is decoded, merged and encoded again.
    pub fn add(&mut self, name: &str, shape: Vec<usize>, format: Format, bytes: &[u8], device: &Device) -> Result<()> {
        let n = self.count(name, &shape)?;
        if bytes.len() != format.stored_len(n) {
            return Err(self.bad(name, format!("{} bytes for shape {shape:?} in {}", bytes.len(), format.name())));
        }
        if self.loras.touches(&self.stem, name) {
            return self.add_converted(name, shape, &format.decode(bytes, n)?, format, device);
        }
        self.store(name, shape, format, bytes, device)
    }

    fn bad(&self, name: &str, msg: String) -> Error {
        Error::Safetensors { path: self.label.clone(), msg: format!("tensor `{name}`: {msg}") }
    }

    fn count(&self, name: &str, shape: &[usize]) -> Result<usize> {
        element_count(shape).ok_or_else(|| self.bad(name, format!("shape {shape:?} is too large")))
    }

    /// Puts `bytes` (checked to be `shape` in `format`) where the tensor is used from.
    fn store(&mut self, name: &str, shape: Vec<usize>, format: Format, bytes: &[u8], device: &Device) -> Result<()> {
        let n = self.count(name, &shape)?;
        let stored = if crate::pipeline::family::on_demand(&self.stem, name) {
            Stored::Packed(format, bytes.to_vec())
        } else if n == 0 || shape.len() < 2 || name.ends_with("embedding.weight") || n as u64 * 4 > crate::device::max_binding_bytes(device) {
            Stored::Host(format.decode(bytes, n)?)
        } else {
            Stored::Device(quant::matrix(format, bytes, matrix_shape(&shape), device).map_err(|e| self.bad(name, e.to_string()))?)
        };
        self.tensors.insert(name.to_owned(), (shape, stored));
        Ok(())
    }

    /// Adds one safetensors entry (`dtype` as the header spells it), converted to `format`;
    /// an f32 or f16 entry kept as it is goes on byte for byte, with no detour through f32.
    pub fn add_safetensors(&mut self, name: &str, dtype: &str, shape: Vec<usize>, raw: &[u8], format: Format, device: &Device) -> Result<()> {
        if matches!((dtype, format), ("F32", Format::F32) | ("F16", Format::F16)) {
            return self.add(name, shape, format, raw, device);
        }
        let values = safetensors_values(&self.label, name, dtype, &shape, raw)?;
        self.add_converted(name, shape, &values, format, device)
    }

    /// Every tensor of the published weight file `stem`, each converted to `format` once, or
    /// with `None` kept in its published precision ([`Format::published`]).
    /// `loras` are merged in before the conversion.
    pub fn from_file(files: &dyn ModelFiles, stem: &str, format: Option<Format>, loras: &Arc<Loras>, device: &Device) -> Result<Self> {
        let (path, bytes) = read_weight_file(files, stem, format)?;
        let mut up = Self::new(stem, files.label(&path)).with_loras(loras);
        let label = up.label.clone();
        each_entry(&label, &bytes, |name, dtype, shape, values| {
            let format = format.unwrap_or(Format::published(dtype));
            up.add_converted(name, shape.to_vec(), &values, format, device)
        })?;
        Ok(up)
    }

    /// Adds f32 `values`, merged with any LoRA before they are converted to the format
    /// `format` keeps this tensor in.
    fn add_converted(&mut self, name: &str, shape: Vec<usize>, values: &[f32], format: Format, device: &Device) -> Result<()> {
        let stored = format.for_tensor(name, &shape);
        if self.loras.touches(&self.stem, name) {
            let mut merged = values.to_vec();
            self.loras.merge(&self.stem, name, &shape, &mut merged)?;
            return self.store(name, shape, stored, &stored.encode(&merged), device);
        }
        self.store(name, shape, stored, &stored.encode(values), device)
    }
}

/// Whether a safetensors entry of `dtype` is a weight the engine reads. Integer buffers (CLIP's
/// `position_ids` in older exports) are not, and are skipped wherever a file is read.
pub fn is_weight_dtype(dtype: &str) -> bool {
    matches!(dtype, "F32" | "F16" | "BF16")
}

/// Calls `f` with the name, source dtype, shape and f32 values of every weight (see
/// [`is_weight_dtype`]) of the published weight file `stem`, in name order; `target` is the
/// format they are going to ([`weight_file_names`] says which file that reads).
pub fn for_each_tensor(files: &dyn ModelFiles, stem: &str, target: Format, f: impl FnMut(&str, &str, &[usize], Vec<f32>) -> Result<()>) -> Result<()> {
    let (path, bytes) = read_weight_file(files, stem, Some(target))?;
    each_entry(&files.label(&path), &bytes, f)
}

/// [`for_each_tensor`] over the safetensors `bytes`; `label` names the file in messages.
fn each_entry(label: &std::path::Path, bytes: &[u8], mut f: impl FnMut(&str, &str, &[usize], Vec<f32>) -> Result<()>) -> Result<()> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| Error::Safetensors { path: label.to_owned(), msg: e.to_string() })?;
    let mut names = st.names();
    names.sort();
    for name in names {
        let view = st.tensor(name).map_err(|e| Error::Safetensors { path: label.to_owned(), msg: e.to_string() })?;
        let dtype = format!("{:?}", view.dtype());
        if !is_weight_dtype(&dtype) {
            continue;
        }
        f(name, &dtype, view.shape(), safetensors_values(label, name, &dtype, view.shape(), view.data())?)?;
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
    if element_count(shape).and_then(|n| n.checked_mul(width)) != Some(raw.len()) {
        return Err(Error::Safetensors { path: path.to_owned(), msg: format!("tensor `{name}` has {} bytes for shape {shape:?} in {dtype:?}", raw.len()) });
    }
    to_f32(dtype, raw).ok_or_else(unsupported)
}

#[derive(Clone)]
pub struct Weights {
    source: Source,
    prefix: String,
    device: Device,
    /// The format random weights are converted to as they load (see [`Format::for_tensor`]).
    format: Format,
}

impl Weights {
    fn with_source(source: Source, device: &Device) -> Self {
        Self { source, prefix: String::new(), device: device.clone(), format: Format::F32 }
    }

    /// Random weights, the same for a tensor name wherever they load ([`name_uniforms`]):
    /// norm scales near 1, biases near 0, other tensors uniform with variance 1/fan_in, which
    /// keeps activations in range through a deep network.
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
            Source::Uploaded(_) => (0, 0),
        }
    }

    /// The view under `prefix.name`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        Self { prefix: self.full_name(&name.to_string()), ..self.clone() }
    }

    pub fn contains(&self, name: &str) -> bool {
        match &self.source {
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
        let values = self.source_values(&full, shape)?;
        Ok(if stored == Format::F32 { values } else { stored.decode(&stored.encode(&values), values.len())? })
    }

    /// The values as the source holds them, before any conversion.
    fn source_values(&self, full: &str, shape: &[usize]) -> Result<Vec<f32>> {
        match &self.source {
            Source::Random(stats) => {
                let n = shape.iter().product::<usize>();
                stats.stored_bytes.fetch_add(self.format.for_tensor(full, shape).stored_len(n) as u64, Ordering::Relaxed);
                Ok(random_values(&stats.values, full, shape))
            }
            Source::Uploaded(up) => match up.lookup(full, shape)? {
                Stored::Host(values) => Ok(values.clone()),
                Stored::Packed(format, bytes) => format.decode(bytes, shape.iter().product()),
                Stored::Device(_) => Err(Error::Invalid(format!("{}: `{full}` ({shape:?}) lives on the device", up.label.display()))),
            },
        }
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
        let values = self.source_values(&full, shape)?;
        let stored = self.format.for_tensor(&full, shape);
        let bytes = stored.encode(&values);
        quant::matrix(stored, &bytes, matrix_shape(shape), &self.device)
    }
}

/// The files a weight file `stem` may be published as, in order of preference: the fp16
/// variant first (half the download, and what the engine keeps on a GPU with shader-f16), so
/// the page and the CLI take the same file from a repo that has both.
pub fn weight_file_names(stem: &str) -> [String; 2] {
    [format!("{stem}.fp16.safetensors"), format!("{stem}.safetensors")]
}

/// The path and bytes of the first of [`weight_file_names`] that `files` has; converting to
/// f32 asks for full precision, so it takes the full file first.
fn read_weight_file(files: &dyn ModelFiles, stem: &str, target: Option<Format>) -> Result<(String, Vec<u8>)> {
    let mut names = weight_file_names(stem);
    if target == Some(Format::F32) {
        names.reverse();
    }
    for path in &names {
        if let Some(bytes) = files.read(path)? {
            return Ok((path.clone(), bytes));
        }
    }
    let [preferred, other] = names;
    Err(Error::Invalid(format!("{}: neither {preferred} nor {other} exists", files.name())))
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
    count.fetch_add(n as u64, Ordering::Relaxed);
    let u = name_uniforms(name, n);
    if shape.len() == 1 {
        let (base, jitter) = if name.ends_with("weight") { (1.0, 0.2) } else { (0.0, 0.2) };
        return u.map(|u| (base + jitter * u) as f32).collect();
    }
    let fan_in: usize = shape[1..].iter().product();
    let bound = (3.0 / fan_in as f64).sqrt();
    u.map(|u| (u * bound) as f32).collect()
}

/// `n` uniforms in [-1, 1) that depend only on `name`: splitmix64 over FNV-1a of the name plus
/// the index. Random weights drawn so are the same wherever they load, and a reference made
/// elsewhere (scripts/make_fixtures.py) can use them.
pub fn name_uniforms(name: &str, n: usize) -> impl Iterator<Item = f64> {
    let seed = name.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3));
    (0..n as u64).map(move |i| {
        let mut z = seed.wrapping_add(i).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::MemoryFiles;
    use safetensors::tensor::TensorView;

    /// Safetensors bytes holding `tensors` (name, dtype, shape, raw bytes).
    fn safetensors(tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
        safetensors::serialize(tensors.iter().map(|(n, d, s, b)| (*n, TensorView::new(*d, s.clone(), b).unwrap())), None).unwrap()
    }

    /// The model `m` with the given files.
    fn model(files: &[(&str, Vec<u8>)]) -> MemoryFiles {
        MemoryFiles { name: "m".into(), files: files.iter().map(|(p, b)| (p.to_string(), b.clone())).collect() }
    }

    /// The weight file `unet/test` of a model holding `tensors`, loaded as published.
    fn published(tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) -> Weights {
        let files = model(&[("unet/test.safetensors", safetensors(tensors))]);
        Weights::uploaded(Uploaded::from_file(&files, "unet/test", None, &Arc::default(), &Device::flex()).unwrap(), &Device::flex())
    }

    #[test]
    fn empty_tensors_stay_on_the_host() {
        // burn cannot hold a quantized tensor without a block (the fuzzer's find).
        let mut up = Uploaded::new("unet/x", "x");
        for format in Format::ALL {
            up.add("a.weight", vec![0, 0], format, &[], &Device::flex()).unwrap();
        }
    }

    #[test]
    fn element_counts_that_would_wrap_are_refused() {
        assert_eq!(element_count(&[2, 3, 4]), Some(24));
        assert_eq!(element_count(&[]), Some(1));
        assert_eq!(element_count(&[0, 5]), Some(0));
        assert_eq!(element_count(&[0, 2, usize::MAX]), None, "rows × the rest would wrap");
        assert_eq!(element_count(&[usize::MAX / 2]), None, "its f32 bytes would wrap");
    }

    #[test]
    fn reads_f16_and_bf16_as_f32() {
        let halfs: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect();
        let bf: Vec<u8> = [0.25f32, 3.0].iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect();
        let w = published(&[("a.weight", Dtype::F16, vec![2], halfs.clone()), ("b", Dtype::BF16, vec![2], bf)]);
        assert_eq!(w.pp("a").values("weight", &[2]).unwrap(), vec![1.5, -2.0]);
        assert_eq!(w.values("b", &[2]).unwrap(), vec![0.25, 3.0]);
        // A matrix published in f16 stays f16 where the device computes in it.
        let w = published(&[("m", Dtype::F16, vec![1, 2], halfs)]);
        assert_eq!(quant::to_f32(w.matrix("m", &[1, 2]).unwrap()).into_data().try_to_vec::<f32>().unwrap(), vec![1.5, -2.0]);
    }

    #[test]
    fn integer_buffers_are_skipped() {
        let ids: Vec<u8> = (0..3i64).flat_map(|i| i.to_le_bytes()).collect();
        let w = published(&[("text_model.embeddings.position_ids", Dtype::I64, vec![1, 3], ids), ("b", Dtype::F32, vec![1], 1f32.to_le_bytes().to_vec())]);
        assert!(!w.contains("text_model.embeddings.position_ids"));
        assert_eq!(w.values("b", &[1]).unwrap(), vec![1.0]);
    }

    #[test]
    fn errors_name_the_file_tensor_and_shapes() {
        let w = published(&[("conv_in.weight", Dtype::F32, vec![2, 2], vec![0; 16])]);
        let err = w.pp("conv_in").matrix("weight", &[2, 3]).unwrap_err().to_string();
        assert_eq!(err, "m/unet/test.safetensors: tensor `conv_in.weight` has shape [2, 2], expected [2, 3]");
        let err = w.pp("conv_out").values("weight", &[2]).unwrap_err().to_string();
        assert_eq!(err, "m/unet/test.safetensors: tensor `conv_out.weight` is missing");
    }

    #[test]
    fn malformed_files_are_refused() {
        let files = model(&[("vae/x.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}".to_vec())]);
        let err = Uploaded::from_file(&files, "vae/x", None, &Arc::default(), &Device::flex()).err().unwrap().to_string();
        assert!(err.starts_with("m/vae/x.safetensors: not a valid safetensors file"), "{err}");
    }

    #[test]
    fn prefers_fp16_and_falls_back_to_the_full_file() {
        let one = |dtype: Dtype, data: Vec<u8>| safetensors(&[("x", dtype, vec![1], data)]);
        let (half, full) = (one(Dtype::F16, half::f16::from_f32(2.0).to_le_bytes().to_vec()), one(Dtype::F32, 1.0f32.to_le_bytes().to_vec()));
        let value = |files: &MemoryFiles, format| {
            Weights::uploaded(Uploaded::from_file(files, "model", format, &Arc::default(), &Device::flex()).unwrap(), &Device::flex()).values("x", &[1]).unwrap()
        };
        let both = model(&[("model.fp16.safetensors", half.clone()), ("model.safetensors", full.clone())]);
        assert_eq!(value(&model(&[("model.safetensors", full)]), None), vec![1.0]);
        assert_eq!(value(&both, None), vec![2.0]);
        assert_eq!(value(&both, Some(Format::Q8)), vec![2.0]);
        // Converting to f32 asks for full precision.
        assert_eq!(value(&both, Some(Format::F32)), vec![1.0]);
        assert_eq!(value(&model(&[("model.fp16.safetensors", half)]), Some(Format::F32)), vec![2.0]);
        let err = Uploaded::from_file(&model(&[]), "other", None, &Arc::default(), &Device::flex()).err().unwrap().to_string();
        assert!(err.contains("neither other.fp16.safetensors nor other.safetensors"), "{err}");
    }
}
