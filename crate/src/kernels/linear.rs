//! `torch.nn.Linear` from the weight as PyTorch lays it out (`[out, in]`, read row by row, so
//! no transposed copy), with the bias and a residual folded in; or the first layer of a GEGLU
//! feed-forward, whose output halves are combined as `value · gelu(gate)` in the same pass.
//!
//! Each work item accumulates 4 rows × 4 output columns in registers (both halves for GEGLU).
use burn::backend::Dispatch;
use burn::tensor::activation::gelu;
use burn::tensor::{FloatDType, Shape, Tensor};
use burn::backend::cubecl::dtype_to_storage_type;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use super::{KilnKernels, contiguous, elementwise, on_gpu};

/// What follows the matrix product.
#[derive(Default)]
pub struct LinearEpilogue<const D: usize> {
    /// Added to the output, shaped like it.
    pub residual: Option<Tensor<D>>,
    /// The output is `[.., out / 2]`: the first half of the columns times GELU of the second.
    pub geglu: bool,
}

/// `x · weightᵀ + bias` over the last axis of `x`; `weight` is `[out, in]`, f32 or f16 (read
/// as it is and widened as the kernel loads it).
pub fn linear<const D: usize>(x: Tensor<D>, weight: Tensor<2>, bias: Option<Tensor<1>>, epilogue: LinearEpilogue<D>) -> Tensor<D> {
    if !on_gpu(&x.device()) {
        return reference(x, weight.cast(FloatDType::F32), bias, epilogue);
    }
    let terms = Terms { bias: bias.is_some(), residual: epilogue.residual.is_some(), geglu: epilogue.geglu };
    // Absent terms' arguments: an f32 tensor the kernel never reads.
    let stand_in = || x.clone().flatten::<1>(0, D - 1).into_dispatch();
    Tensor::from_dispatch(<Dispatch as KilnKernels>::linear(
        x.clone().into_dispatch(),
        weight.into_dispatch(),
        bias.map_or_else(stand_in, Tensor::into_dispatch),
        epilogue.residual.map_or_else(stand_in, Tensor::into_dispatch),
        terms,
    ))
}

/// Which terms a launch has; GEGLU halves the output width.
#[derive(Clone, Copy, Debug)]
pub struct Terms {
    pub bias: bool,
    pub residual: bool,
    pub geglu: bool,
}

/// burn's linear (which wants `[in, out]`) and elementwise ops.
fn reference<const D: usize>(x: Tensor<D>, weight: Tensor<2>, bias: Option<Tensor<1>>, epilogue: LinearEpilogue<D>) -> Tensor<D> {
    let mut out = burn::tensor::module::linear(x, weight.transpose(), bias);
    if epilogue.geglu {
        let mut halves = out.chunk(2, D - 1);
        let gate = halves.pop().expect("two halves");
        out = halves.pop().expect("two halves") * gelu(gate);
    }
    match epilogue.residual {
        Some(residual) => out + residual,
        None => out,
    }
}

pub(super) fn output_shape(x: &Shape, weight: &Shape, terms: &Terms) -> Shape {
    let mut shape = x.clone();
    let last = shape.num_dims() - 1;
    shape[last] = if terms.geglu { weight[0] / 2 } else { weight[0] };
    shape
}

pub(super) fn launch(x: CubeTensor, weight: CubeTensor, bias: CubeTensor, residual: CubeTensor, terms: Terms) -> CubeTensor {
    let x = contiguous(x);
    let shape = output_shape(x.meta.shape(), weight.meta.shape(), &terms);
    let columns = shape[shape.num_dims() - 1];
    let rows = shape.num_elements() / columns;
    let out = empty_device_dtype(x.client.clone(), x.device.clone(), shape, x.dtype);
    let client = x.client.clone();
    let (count, dim) = elementwise(&client, rows.div_ceil(4) * columns.div_ceil(4));
    let weight_type = dtype_to_storage_type(weight.dtype);
    // SAFETY: rows and columns past the edges are clamped on read and skipped on write.
    unsafe {
        shader::linear_tile::launch_unchecked(
            &client,
            count,
            dim,
            x.into_tensor_arg(),
            contiguous(weight).into_tensor_arg(),
            contiguous(bias).into_tensor_arg(),
            contiguous(residual).into_tensor_arg(),
            out.clone().into_tensor_arg(),
            rows,
            columns,
            terms.bias,
            terms.residual,
            terms.geglu,
            weight_type,
        );
    }
    out
}

/// The kernel, in cubecl's own language (its `Tensor` is a kernel argument).
mod shader {
    use cubecl::prelude::*;

    #[cube(launch_unchecked)]
    #[allow(clippy::too_many_arguments)]
    pub fn linear_tile<W: Float>(
        x: &Tensor<f32>,
        weight: &Tensor<W>,
        bias: &Tensor<f32>,
        residual: &Tensor<f32>,
        out: &mut Tensor<f32>,
        rows: usize,
        columns: usize,
        #[comptime] has_bias: bool,
        #[comptime] has_residual: bool,
        #[comptime] geglu: bool,
        #[define(W)] _weight: ElemType,
    ) {
        let column_tiles = (columns + 3) / 4;
        let n0 = (ABSOLUTE_POS % column_tiles) * 4;
        let m0 = (ABSOLUTE_POS / column_tiles) * 4;
        if m0 >= rows {
            terminate!();
        }
        let k_len = x.shape(x.rank() - 1);
        // GEGLU's gate for column n is weight row n + columns.
        let halves = comptime![if geglu { 2usize } else { 1usize }];
        let mut acc = Array::<f32>::new(comptime![16 * halves]);
        #[unroll]
        for i in 0..comptime![16 * halves] {
            acc[i] = 0.0f32;
        }
        for k in 0..k_len {
            let mut xs = Array::<f32>::new(4usize);
            #[unroll]
            for r in 0..4usize {
                xs[r] = x[min(m0 + r, rows - 1) * k_len + k];
            }
            #[unroll]
            for half in 0..halves {
                #[unroll]
                for c in 0..4usize {
                    let n = min(n0 + c, columns - 1) + half * columns;
                    let w = f32::cast_from(weight[n * k_len + k]);
                    #[unroll]
                    for r in 0..4usize {
                        acc[half * 16 + r * 4 + c] += xs[r] * w;
                    }
                }
            }
        }

        #[unroll]
        for c in 0..4usize {
            let n = n0 + c;
            if n < columns {
                #[unroll]
                for r in 0..4usize {
                    let m = m0 + r;
                    if m < rows {
                        let mut v = acc[r * 4 + c];
                        if has_bias {
                            v += bias[n];
                        }
                        if geglu {
                            let mut gate = acc[16 + r * 4 + c];
                            if has_bias {
                                gate += bias[n + columns];
                            }
                            // GELU with the exact erf, as torch's default.
                            v *= gate * 0.5f32 * (1.0f32 + Erf::erf(gate * 0.70710678f32));
                        }
                        if has_residual {
                            v += residual[m * columns + n];
                        }
                        out[m * columns + n] = v;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::{gpu, max_diff, random};

    #[test]
    fn equals_burns_linear() {
        let Some(device) = gpu() else { return };
        // 2 × 77 rows and 30 columns leave partial tiles on both edges.
        let x = random([2, 77, 24], &device);
        for geglu in [false, true] {
            let weight = random([60, 24], &device);
            let bias = random([60], &device);
            let width = if geglu { 30 } else { 60 };
            let residual = random([2, 77, width], &device);
            let with = |residual| LinearEpilogue { residual, geglu };
            let ours = linear(x.clone(), weight.clone(), Some(bias.clone()), with(Some(residual.clone())));
            let diff = max_diff(ours, reference(x.clone(), weight.clone(), Some(bias.clone()), with(Some(residual))));
            assert!(diff < 1e-4, "geglu {geglu}: {diff}");
            let diff = max_diff(linear(x.clone(), weight.clone(), None, with(None)), reference(x.clone(), weight.clone(), None, with(None)));
            assert!(diff < 1e-4, "no bias, geglu {geglu}: {diff}");
            if device.supports_dtype(burn::tensor::DType::F16) {
                // An f16 weight is read as it is: the same as widening it first.
                let half = weight.cast(FloatDType::F16);
                let ours = linear(x.clone(), half.clone(), Some(bias.clone()), with(None));
                let diff = max_diff(ours, reference(x.clone(), half.cast(FloatDType::F32), Some(bias), with(None)));
                assert!(diff < 1e-4, "f16, geglu {geglu}: {diff}");
            }
        }
    }
}
