//! Scaled dot-product attention as one online-softmax pass: each work item owns one query row
//! of one head, walks the keys once keeping the running maximum, the softmax denominator and
//! the weighted sum of values in registers, and never stores a score. It reads q, k and v as
//! the projections leave them (`[B, N, heads · d]`) and writes the same layout, so no head is
//! ever split out or merged back.
use burn::backend::Dispatch;
use burn::tensor::Tensor;
use burn::tensor::ops::AttentionModuleOptions;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use super::{KilnKernels, contiguous, elementwise, on_gpu};

/// Attention over `[B, N, heads · d]` queries and `[B, M, heads · d]` keys and values, scale
/// `d^-½`; `causal` lets query `i` see keys `0..=i` only (CLIP).
pub fn attention(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, heads: usize, causal: bool) -> Tensor<3> {
    if !on_gpu(&q.device()) {
        return reference(q, k, v, heads, causal);
    }
    Tensor::from_dispatch(<Dispatch as KilnKernels>::attention(q.into_dispatch(), k.into_dispatch(), v.into_dispatch(), heads, causal))
}

/// burn's attention op on the heads split out (the CPU backend's runs flash-style on long rows).
fn reference(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, heads: usize, causal: bool) -> Tensor<3> {
    let [b, n, width] = q.dims();
    let split = |t: Tensor<3>| {
        let len = t.dims()[1];
        t.reshape([b, len, heads, width / heads]).swap_dims(1, 2)
    };
    let options = AttentionModuleOptions { scale: None, softcap: None, is_causal: causal };
    burn::tensor::module::attention(split(q), split(k), split(v), None, None, options).swap_dims(1, 2).reshape([b, n, width])
}

pub(super) fn launch(q: CubeTensor, k: CubeTensor, v: CubeTensor, heads: usize, causal: bool) -> CubeTensor {
    let q = contiguous(q);
    let [batch, queries, width] = super::dims::<3>(q.meta.shape());
    let out = empty_device_dtype(q.client.clone(), q.device.clone(), q.meta.shape().clone(), q.dtype);
    let client = q.client.clone();
    let (count, dim) = elementwise(&client, batch * heads * queries);
    let head_dim = width / heads;
    let scale = (head_dim as f32).powf(-0.5);
    // SAFETY: item (b, h, i) reads row i of q, rows 0..M of k and v, each within head h's
    // columns, and writes row i of the output there.
    unsafe {
        shader::attention_rows::launch_unchecked(
            &client,
            count,
            dim,
            q.into_tensor_arg(),
            contiguous(k).into_tensor_arg(),
            contiguous(v).into_tensor_arg(),
            out.clone().into_tensor_arg(),
            heads,
            scale,
            head_dim,
            causal,
        );
    }
    out
}

/// The kernels, in cubecl's own language (its `Tensor` is a kernel argument).
mod shader {
    use cubecl::prelude::*;

    #[cube(launch_unchecked)]
    #[allow(clippy::too_many_arguments)]
    pub fn attention_rows(
        q: &Tensor<f32>,
        k: &Tensor<f32>,
        v: &Tensor<f32>,
        out: &mut Tensor<f32>,
        heads: usize,
        scale: f32,
        #[comptime] head_dim: usize,
        #[comptime] causal: bool,
    ) {
        let queries = q.shape(1);
        let keys = k.shape(1);
        let width = q.shape(2);
        let i = ABSOLUTE_POS % queries;
        let bh = ABSOLUTE_POS / queries;
        let h = bh % heads;
        let b = bh / heads;
        if b >= q.shape(0) {
            terminate!();
        }
        let q_row = (b * queries + i) * width + h * head_dim;
        let mut query = Array::<f32>::new(head_dim);
        let mut acc = Array::<f32>::new(head_dim);
        #[unroll]
        for d in 0..head_dim {
            query[d] = q[q_row + d] * scale;
            acc[d] = 0.0f32;
        }
        let mut running_max = f32::new(-3.0e38);
        let mut sum = 0.0f32;
        let mut end = keys;
        if causal {
            end = i + 1;
        }
        for j in 0..end {
            let kv_row = (b * keys + j) * width + h * head_dim;
            let mut score = 0.0f32;
            #[unroll]
            for d in 0..head_dim {
                score += query[d] * k[kv_row + d];
            }
            let new_max = max(running_max, score);
            let rescale = (running_max - new_max).exp();
            let p = (score - new_max).exp();
            sum = sum * rescale + p;
            #[unroll]
            for d in 0..head_dim {
                acc[d] = acc[d] * rescale + p * v[kv_row + d];
            }
            running_max = new_max;
        }
        let inv = 1.0f32 / sum;
        #[unroll]
        for d in 0..head_dim {
            out[q_row + d] = acc[d] * inv;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::{gpu, max_diff, random};

    #[test]
    fn equals_burns_attention() {
        let Some(device) = gpu() else { return };
        // Cross-attention to 77 text tokens, self-attention, and CLIP's causal self-attention.
        for (n, m, heads, causal) in [(64, 77, 4, false), (50, 50, 2, false), (77, 77, 4, true)] {
            let q = random([2, n, heads * 8], &device);
            let (k, v) = (random([2, m, heads * 8], &device), random([2, m, heads * 8], &device));
            let ours = attention(q.clone(), k.clone(), v.clone(), heads, causal);
            let diff = max_diff(ours, reference(q, k, v, heads, causal));
            assert!(diff < 1e-5, "n {n} m {m} causal {causal}: {diff}");
        }
    }
}
