//! `torch.nn.GroupNorm` over `[N, C, H, W]`, optionally followed by SiLU (every resnet's
//! `silu(norm(x))`): statistics in f32 as PyTorch computes them, then one pass that normalizes,
//! scales and activates.
//!
//! The statistics come from Welford partials over chunks of each group (no barriers, enough
//! work items for a large group), merged per group when there is more than one chunk.
use burn::backend::Dispatch;
use burn::tensor::{Shape, Tensor};
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use super::{KilnKernels, contiguous, elementwise, on_gpu};

/// Elements one work item of the statistics pass folds.
const CHUNK: usize = 2048;

/// `x` normalized per group of `groups` channel blocks, scaled by `weight`, shifted by `bias`
/// (both `[C]`), then passed through SiLU when `silu`.
pub fn group_norm(x: Tensor<4>, weight: Tensor<1>, bias: Tensor<1>, groups: usize, eps: f64, silu: bool) -> Tensor<4> {
    if !on_gpu(&x.device()) {
        return reference(x, weight, bias, groups, eps, silu);
    }
    Tensor::from_dispatch(<Dispatch as KilnKernels>::group_norm(x.into_dispatch(), weight.into_dispatch(), bias.into_dispatch(), groups, eps as f32, silu))
}

/// burn's ops, as the CPU backend runs them.
fn reference(x: Tensor<4>, weight: Tensor<1>, bias: Tensor<1>, groups: usize, eps: f64, silu: bool) -> Tensor<4> {
    let [n, c, h, w] = x.dims();
    let grouped = x.reshape([n, groups, (c / groups) * h * w]);
    let (var, mean) = grouped.clone().var_mean_bias(2);
    let normed = ((grouped - mean) / (var + eps).sqrt()).reshape([n, c, h, w]);
    let out = normed * weight.reshape([1, c, 1, 1]) + bias.reshape([1, c, 1, 1]);
    if silu { burn::tensor::activation::silu(out) } else { out }
}

pub(super) fn launch(x: CubeTensor, weight: CubeTensor, bias: CubeTensor, groups: usize, eps: f32, silu: bool) -> CubeTensor {
    let x = contiguous(x);
    let [n, c, h, w] = super::dims::<4>(x.meta.shape());
    let group_len = (c / groups) * h * w;
    let chunks = group_len.div_ceil(CHUNK);
    let client = x.client.clone();
    let stats_shape = Shape::new([n * groups, 3]);
    let partials = empty_device_dtype(client.clone(), x.device.clone(), Shape::new([n * groups * chunks, 3]), x.dtype);
    let (count, dim) = elementwise(&client, n * groups * chunks);
    // SAFETY: every index the kernels form lies inside the tensors sized here.
    unsafe {
        shader::group_partials::launch_unchecked(&client, count, dim, x.clone().into_tensor_arg(), partials.clone().into_tensor_arg(), group_len, chunks);
    }
    let stats = if chunks == 1 {
        partials
    } else {
        let stats = empty_device_dtype(client.clone(), x.device.clone(), stats_shape, x.dtype);
        let (count, dim) = elementwise(&client, n * groups);
        unsafe {
            shader::merge_partials::launch_unchecked(&client, count, dim, partials.into_tensor_arg(), stats.clone().into_tensor_arg(), chunks);
        }
        stats
    };
    let out = empty_device_dtype(client.clone(), x.device.clone(), x.meta.shape().clone(), x.dtype);
    let (count, dim) = elementwise(&client, n * c * h * w);
    unsafe {
        shader::normalize::launch_unchecked(
            &client,
            count,
            dim,
            x.into_tensor_arg(),
            stats.into_tensor_arg(),
            contiguous(weight).into_tensor_arg(),
            contiguous(bias).into_tensor_arg(),
            out.clone().into_tensor_arg(),
            h * w,
            c / groups,
            eps,
            silu,
        );
    }
    out
}

/// The kernels, in cubecl's own language (its `Tensor` is a kernel argument).
mod shader {
    use cubecl::prelude::*;

    /// Work item `i` folds chunk `i % chunks` of group `i / chunks` (a group's elements are
    /// contiguous in NCHW) into Welford's (count, mean, M2).
    #[cube(launch_unchecked)]
    pub fn group_partials(x: &Tensor<f32>, partials: &mut Tensor<f32>, group_len: usize, chunks: usize) {
        let item = ABSOLUTE_POS;
        if item >= partials.len() / 3 {
            terminate!();
        }
        let group = item / chunks;
        let chunk = item % chunks;
        let begin = chunk * group_len / chunks;
        let end = (chunk + 1) * group_len / chunks;
        let base = group * group_len;
        let mut mean = 0.0f32;
        let mut m2 = 0.0f32;
        let mut k = 0.0f32;
        for i in begin..end {
            let v = x[base + i];
            k += 1.0;
            let delta = v - mean;
            mean += delta / k;
            m2 += delta * (v - mean);
        }
        partials[item * 3] = k;
        partials[item * 3 + 1] = mean;
        partials[item * 3 + 2] = m2;
    }

    /// Merges a group's chunk partials (Chan et al.'s parallel Welford).
    #[cube(launch_unchecked)]
    pub fn merge_partials(partials: &Tensor<f32>, stats: &mut Tensor<f32>, chunks: usize) {
        let group = ABSOLUTE_POS;
        if group >= stats.len() / 3 {
            terminate!();
        }
        let mut count = 0.0f32;
        let mut mean = 0.0f32;
        let mut m2 = 0.0f32;
        for chunk in 0..chunks {
            let at = (group * chunks + chunk) * 3;
            let k = partials[at];
            if k > 0.0 {
                let total = count + k;
                let delta = partials[at + 1] - mean;
                mean += delta * k / total;
                m2 += partials[at + 2] + delta * delta * count * k / total;
                count = total;
            }
        }
        stats[group * 3] = count;
        stats[group * 3 + 1] = mean;
        stats[group * 3 + 2] = m2;
    }

    /// `(x - mean) / sqrt(var + eps) * weight + bias`, then SiLU when `silu`.
    #[cube(launch_unchecked)]
    #[allow(clippy::too_many_arguments)]
    pub fn normalize(
        x: &Tensor<f32>,
        stats: &Tensor<f32>,
        weight: &Tensor<f32>,
        bias: &Tensor<f32>,
        out: &mut Tensor<f32>,
        plane: usize,
        channels_per_group: usize,
        eps: f32,
        #[comptime] silu: bool,
    ) {
        let i = ABSOLUTE_POS;
        if i >= out.len() {
            terminate!();
        }
        let channel = (i / plane) % weight.len();
        let sample_channel = i / plane;
        let group = sample_channel / channels_per_group;
        let count = stats[group * 3];
        let mean = stats[group * 3 + 1];
        let var = stats[group * 3 + 2] / count;
        let y = (x[i] - mean) / f32::sqrt(var + eps) * weight[channel] + bias[channel];
        if silu {
            out[i] = y / (1.0 + f32::exp(-y));
        } else {
            out[i] = y;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::{gpu, max_diff, random};

    #[test]
    fn equals_burns_ops() {
        let Some(device) = gpu() else { return };
        // One chunk per group, and several (a group of 3 · 40 · 40 = 4800 values).
        for (shape, groups) in [([2, 8, 4, 4], 4), ([1, 12, 40, 40], 4)] {
            let x = random(shape, &device).mul_scalar(3.0).add_scalar(5.0);
            let (weight, bias) = (random([shape[1]], &device), random([shape[1]], &device));
            for silu in [false, true] {
                let ours = group_norm(x.clone(), weight.clone(), bias.clone(), groups, 1e-5, silu);
                let theirs = reference(x.clone(), weight.clone(), bias.clone(), groups, 1e-5, silu);
                let diff = max_diff(ours, theirs);
                assert!(diff < 2e-5, "{shape:?} silu {silu}: {diff}");
            }
        }
    }
}
