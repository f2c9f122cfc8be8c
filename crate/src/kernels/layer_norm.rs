//! `torch.nn.LayerNorm` over the last axis: one work item per row, two passes (mean, then the
//! variance around it) as PyTorch's f32 kernels compute it.
use burn::backend::Dispatch;
use burn::tensor::Tensor;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use super::{KilnKernels, contiguous, elementwise, on_gpu};

pub fn layer_norm<const D: usize>(x: Tensor<D>, weight: Tensor<1>, bias: Tensor<1>, eps: f64) -> Tensor<D> {
    if !on_gpu(&x.device()) {
        return burn::tensor::module::layer_norm(x, weight, Some(bias), eps);
    }
    Tensor::from_dispatch(<Dispatch as KilnKernels>::layer_norm(x.into_dispatch(), weight.into_dispatch(), bias.into_dispatch(), eps as f32))
}

pub(super) fn launch(x: CubeTensor, weight: CubeTensor, bias: CubeTensor, eps: f32) -> CubeTensor {
    let x = contiguous(x);
    let shape = x.meta.shape().clone();
    let dim = shape[shape.num_dims() - 1];
    let rows = shape.num_elements() / dim;
    let out = empty_device_dtype(x.client.clone(), x.device.clone(), shape, x.dtype);
    let (count, cube_dim) = elementwise(&x.client, rows);
    // SAFETY: row `r` reads and writes `[r · dim, (r + 1) · dim)`, inside both tensors.
    unsafe {
        shader::normalize_rows::launch_unchecked(
            &x.client,
            count,
            cube_dim,
            x.clone().into_tensor_arg(),
            contiguous(weight).into_tensor_arg(),
            contiguous(bias).into_tensor_arg(),
            out.clone().into_tensor_arg(),
            dim,
            eps,
        );
    }
    out
}

/// The kernels, in cubecl's own language (its `Tensor` is a kernel argument).
mod shader {
    use cubecl::prelude::*;

    #[cube(launch_unchecked)]
    pub fn normalize_rows(x: &Tensor<f32>, weight: &Tensor<f32>, bias: &Tensor<f32>, out: &mut Tensor<f32>, dim: usize, eps: f32) {
        let row = ABSOLUTE_POS;
        if row * dim >= out.len() {
            terminate!();
        }
        let base = row * dim;
        let mut sum = 0.0f32;
        for i in 0..dim {
            sum += x[base + i];
        }
        let mean = sum / f32::cast_from(dim);
        let mut squares = 0.0f32;
        for i in 0..dim {
            let d = x[base + i] - mean;
            squares += d * d;
        }
        let scale = 1.0f32 / (squares / f32::cast_from(dim) + eps).sqrt();
        for i in 0..dim {
            out[base + i] = (x[base + i] - mean) * scale * weight[i] + bias[i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::{gpu, max_diff, random};

    #[test]
    fn equals_burns_layer_norm() {
        let Some(device) = gpu() else { return };
        let x = random([2, 77, 48], &device).add_scalar(2.0);
        let (weight, bias) = (random([48], &device), random([48], &device));
        let ours = layer_norm(x.clone(), weight.clone(), bias.clone(), 1e-5);
        let theirs = burn::tensor::module::layer_norm(x, weight, Some(bias), 1e-5);
        let diff = max_diff(ours, theirs);
        assert!(diff < 1e-5, "{diff}");
    }
}
