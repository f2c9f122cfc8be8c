//! Stored weight formats: f32, f16, and symmetric per-block q8 / q4.
//!
//! A quantized tensor is viewed as a matrix `[shape[0], product of the rest]` (a conv weight
//! `[out, in, k, k]` becomes `[out, in·k·k]`) and cut along its rows into blocks of
//! [`BLOCK`] values. Each block keeps one f16 scale `s = max|x| / q_max` (rounded up, so the
//! largest value never clips) and the integers `q = round(x / s)` in `[-q_max, q_max]`:
//! `q_max` = 127 for q8, 7 for q4. Bytes on disk: the values (q8: one `i8` each; q4: two per
//! byte, the even element in the low nibble), then the scales as little-endian f16.
//!
//! That layout is also what burn's `QFloat` tensors hold (values packed in `u32` words, then
//! the scales), so a quantized weight goes to the GPU as it is stored and stays quantized
//! there; f16 weights stay f16 where the adapter computes in f16, and the engine's kernels
//! widen each value as they load it. A quantized weight is dequantized for its layer's call
//! ([`for_kernel`]).
use burn::tensor::quantization::{QuantScheme, QuantStore, QuantValue, ScaleDtype};
use burn::tensor::{DType, Device, FloatDType, Tensor, TensorData};
use half::f16;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Values per quantization block (one scale each).
pub const BLOCK: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(test, derive(ts_rs::TS), ts(export))]
pub enum Format {
    F32,
    F16,
    Q8,
    Q4,
}

impl Format {
    pub const ALL: [Format; 4] = [Format::F32, Format::F16, Format::Q8, Format::Q4];

    pub fn name(self) -> &'static str {
        match self {
            Format::F32 => "f32",
            Format::F16 => "f16",
            Format::Q8 => "q8",
            Format::Q4 => "q4",
        }
    }

    pub fn from_name(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|f| f.name() == name)
            .ok_or_else(|| Error::Invalid(format!("unknown weight format `{name}` (expected f32, f16, q8 or q4)")))
    }

    fn q_max(self) -> Option<f32> {
        match self {
            Format::Q8 => Some(127.0),
            Format::Q4 => Some(7.0),
            Format::F32 | Format::F16 => None,
        }
    }

    /// The format a published safetensors tensor is kept in "as published": f16 stays f16,
    /// f32 and bf16 (which no device here computes in) are f32.
    pub fn published(dtype: &str) -> Format {
        if dtype == "F16" { Format::F16 } else { Format::F32 }
    }

    /// Bytes that `n` values take in this format.
    pub fn stored_len(self, n: usize) -> usize {
        match self {
            Format::F32 => 4 * n,
            Format::F16 => 2 * n,
            Format::Q8 => n + 2 * n.div_ceil(BLOCK),
            Format::Q4 => n.div_ceil(2) + 2 * n.div_ceil(BLOCK),
        }
    }

    /// The format a tensor is stored in when a model is packed as `self`. Quantization is for
    /// the large matrices only: norms, biases and embeddings, the convolutions that read and
    /// write latents and images (`conv_in`, `conv_out`, `quant_conv`, `post_quant_conv`), and
    /// rows that don't split into whole blocks stay f16.
    pub fn for_tensor(self, name: &str, shape: &[usize]) -> Format {
        if self.q_max().is_none() {
            return self;
        }
        let leaf = name.rsplit('.').nth(1).unwrap_or(name);
        let row: usize = shape.iter().skip(1).product();
        let keep = shape.len() < 2
            || name.ends_with("embedding.weight")
            || matches!(leaf, "conv_in" | "conv_out" | "quant_conv" | "post_quant_conv")
            || row % BLOCK != 0;
        if keep { Format::F16 } else { self }
    }

    /// Encodes f32 values in this format.
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        let Some(q_max) = self.q_max() else {
            return match self {
                Format::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                _ => values.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect(),
            };
        };
        let mut quants = Vec::with_capacity(values.len());
        let mut scales = Vec::with_capacity(2 * values.len().div_ceil(BLOCK));
        for block in values.chunks(BLOCK) {
            let scale = best_scale(block, q_max);
            let s = scale.to_f32();
            quants.extend(block.iter().map(|&v| quantize(v, s, q_max)));
            scales.extend(scale.to_le_bytes());
        }
        let mut bytes: Vec<u8> = match self {
            Format::Q8 => quants.iter().map(|&q| q as u8).collect(),
            _ => quants.chunks(2).map(|p| (p[0] as u8 & 0xF) | (p.get(1).map_or(0, |&q| q as u8 & 0xF) << 4)).collect(),
        };
        bytes.extend(scales);
        bytes
    }

    /// Decodes `n` values stored in this format.
    pub fn decode(self, bytes: &[u8], n: usize) -> Result<Vec<f32>> {
        if bytes.len() != self.stored_len(n) {
            return Err(Error::Invalid(format!("{} bytes cannot hold {n} values in {}", bytes.len(), self.name())));
        }
        Ok(match self {
            Format::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Format::F16 => bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Format::Q8 | Format::Q4 => {
                let (quants, scales) = bytes.split_at(bytes.len() - 2 * n.div_ceil(BLOCK));
                let scale = |i: usize| f16::from_le_bytes([scales[2 * (i / BLOCK)], scales[2 * (i / BLOCK) + 1]]).to_f32();
                let q = |i: usize| match self {
                    Format::Q8 => quants[i] as i8,
                    // Shift the nibble to the top and back, so its sign bit extends.
                    _ => ((quants[i / 2] >> (4 * (i % 2))) << 4) as i8 >> 4,
                };
                (0..n).map(|i| q(i) as f32 * scale(i)).collect()
            }
        })
    }
}

fn quantize(v: f32, scale: f32, q_max: f32) -> i8 {
    if scale == 0.0 { 0 } else { (v / scale).round().clamp(-q_max, q_max) as i8 }
}

/// The block's scale with the least squared error: the one that just fits the largest value,
/// or a slightly smaller one that clips it but resolves the others more finely (this matters
/// for heavy-tailed trained weights, hardly for uniform random ones).
fn best_scale(block: &[f32], q_max: f32) -> f16 {
    let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
    let mut fitting = f16::from_f32(max / q_max);
    if fitting.to_f32() * q_max < max {
        fitting = f16::from_bits(fitting.to_bits() + 1);
    }
    let error = |scale: f16| -> f32 {
        let s = scale.to_f32();
        block.iter().map(|&v| (v - quantize(v, s, q_max) as f32 * s).powi(2)).sum()
    };
    (1..=10)
        .map(|k| f16::from_f32(fitting.to_f32() * (1.0 - 0.02 * k as f32)))
        .fold((fitting, error(fitting)), |best, s| {
            let e = error(s);
            if e < best.1 { (s, e) } else { best }
        })
        .0
}

/// A weight matrix `[rows, cols]` on the device from its stored bytes, in its stored format
/// where the device can hold it: q8 and q4 stay quantized (burn `QFloat`, one scale per block
/// along the rows); f16 stays f16 where the adapter has shader-f16, else it becomes f32.
pub fn matrix(format: Format, bytes: &[u8], [rows, cols]: [usize; 2], device: &Device) -> Result<Tensor<2>> {
    let value = match format {
        Format::Q8 => QuantValue::Q8S,
        Format::Q4 => QuantValue::Q4S,
        Format::F16 if device.supports_dtype(DType::F16) => {
            if bytes.len() != format.stored_len(rows * cols) {
                return Err(Error::Invalid(format!("{} bytes cannot hold {} values in f16", bytes.len(), rows * cols)));
            }
            let values: Vec<f16> = bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]])).collect();
            return Ok(Tensor::from_data(TensorData::new(values, [rows, cols]), (device, DType::F16)));
        }
        Format::F32 | Format::F16 => {
            let values = format.decode(bytes, rows * cols)?;
            return Ok(Tensor::from_data(TensorData::new(values, [rows, cols]), device));
        }
    };
    if cols % BLOCK != 0 || bytes.len() != format.stored_len(rows * cols) {
        return Err(Error::Invalid(format!("a {} matrix [{rows}, {cols}] needs rows of whole {BLOCK}-value blocks", format.name())));
    }
    // burn's dequantizing kernel reads f16 scales as f16, which needs the shader-f16 feature
    // (many WebGPU adapters, SwiftShader among them, lack it); there the scales go up as f32.
    let f16_scales = device.supports_dtype(DType::F16);
    let scale_dtype = if f16_scales { ScaleDtype::F16 } else { ScaleDtype::F32 };
    let scheme = QuantScheme::default().with_value(value).with_store(QuantStore::PackedU32(0)).per_block([BLOCK as u8], scale_dtype);
    // burn wants the packed values padded to whole u32 words, then the scales, padded likewise.
    let split = bytes.len() - 2 * (rows * cols / BLOCK);
    let mut data = bytes[..split].to_vec();
    data.resize(split.next_multiple_of(4), 0);
    if f16_scales {
        data.extend_from_slice(&bytes[split..]);
        data.resize(data.len().next_multiple_of(4), 0);
    } else {
        data.extend(bytes[split..].chunks_exact(2).flat_map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32().to_le_bytes()));
    }
    Ok(Tensor::from_data(TensorData::from_bytes_vec(data, [rows, cols], DType::QFloat(scheme)), device))
}

/// A [`matrix`] in f32, for one call: quantized ones dequantized, f16 ones widened.
pub fn to_f32(matrix: Tensor<2>) -> Tensor<2> {
    matrix.dequantize().cast(FloatDType::F32)
}

/// A [`matrix`] as the engine's kernels read it, for one call: quantized ones dequantized,
/// f16 and f32 ones as they are.
pub fn for_kernel(matrix: Tensor<2>) -> Tensor<2> {
    matrix.dequantize()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 7919 % 1013) as f32 / 506.0 - 1.0) * if i < 32 { 1e-3 } else { 1.0 }).collect()
    }

    #[test]
    fn round_trips_within_half_a_step() {
        let values = ramp(96);
        for format in Format::ALL {
            let decoded = format.decode(&format.encode(&values), values.len()).unwrap();
            for (block, (orig, back)) in values.chunks(BLOCK).zip(decoded.chunks(BLOCK)).enumerate() {
                let max = orig.iter().fold(0f32, |m, v| m.max(v.abs()));
                let step = match format.q_max() {
                    Some(q) => max / q * 1.001,
                    None if format == Format::F16 => max / 1024.0,
                    None => 0.0,
                };
                for (a, b) in orig.iter().zip(back) {
                    assert!((a - b).abs() <= step / 2.0 + 1e-12, "{format:?} block {block}: {a} -> {b}");
                }
            }
        }
    }

    #[test]
    fn device_matrices_equal_the_decoded_bytes() {
        let device = Device::flex();
        let values = ramp(4 * 64);
        for format in Format::ALL {
            let bytes = format.encode(&values);
            let on_device = to_f32(matrix(format, &bytes, [4, 64], &device).unwrap()).into_data().try_to_vec::<f32>().unwrap();
            assert_eq!(on_device, format.decode(&bytes, values.len()).unwrap(), "{format:?}");
        }
    }

    #[test]
    fn defaults_keep_small_and_boundary_tensors_in_f16() {
        let q = Format::Q4;
        assert_eq!(q.for_tensor("down_blocks.0.resnets.0.conv1.weight", &[320, 320, 3, 3]), Format::Q4);
        assert_eq!(q.for_tensor("down_blocks.0.resnets.0.conv1.bias", &[320]), Format::F16);
        assert_eq!(q.for_tensor("conv_in.weight", &[320, 4, 3, 3]), Format::F16);
        assert_eq!(q.for_tensor("decoder.conv_out.weight", &[3, 128, 3, 3]), Format::F16);
        assert_eq!(q.for_tensor("embeddings.token_embedding.weight", &[49408, 768]), Format::F16);
        assert_eq!(q.for_tensor("time_embedding.linear_1.weight", &[1280, 320]), Format::Q4);
        assert_eq!(q.for_tensor("post_quant_conv.weight", &[4, 4, 1, 1]), Format::F16);
        assert_eq!(Format::F32.for_tensor("conv_in.weight", &[320, 4, 3, 3]), Format::F32);
    }
}
