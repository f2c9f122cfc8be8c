//! `torch.nn.Conv2d` (square kernel, groups 1) on NCHW tensors, straight from the weight matrix
//! `[C_out, C_in·k·k]` the layer keeps, with what follows it in the model folded in: the bias,
//! a per-sample channel shift (a resnet's time embedding) and a residual.
//!
//! Each work item accumulates a tile of 4 output channels × 4 neighbouring output pixels in
//! registers: 16 multiply-adds for every 8 values read, and no barrier.
use burn::backend::Dispatch;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{FloatDType, Shape, Tensor};
use burn::backend::cubecl::dtype_to_storage_type;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use super::{KilnKernels, contiguous, elementwise, on_gpu};

/// Output channels and pixels per work item.
const TILE: usize = 4;

/// What is added to the convolution's output besides its bias.
#[derive(Default)]
pub struct Conv2dEpilogue {
    /// `[N, C_out]`, added to every pixel of that sample's channel.
    pub channel_add: Option<Tensor<2>>,
    /// `[N, C_out, H_out, W_out]`, added element by element.
    pub residual: Option<Tensor<4>>,
}

/// The convolution of `x` with `weight` (`[C_out, C_in·k·k]`, f32 or f16, read as it is:
/// each value is widened as the kernel loads it), `stride` and `(begin, end)` padding on both
/// axes, plus `bias` and the epilogue's terms.
pub fn conv2d(x: Tensor<4>, weight: Tensor<2>, bias: Tensor<1>, kernel: usize, stride: usize, padding: (usize, usize), epilogue: Conv2dEpilogue) -> Tensor<4> {
    if !on_gpu(&x.device()) {
        return reference(x, weight.cast(FloatDType::F32), bias, kernel, stride, padding, epilogue);
    }
    let terms = Terms { channel_add: epilogue.channel_add.is_some(), residual: epilogue.residual.is_some() };
    let stand_in = || bias.clone().into_dispatch();
    Tensor::from_dispatch(<Dispatch as KilnKernels>::conv2d(
        x.into_dispatch(),
        weight.into_dispatch(),
        bias.clone().into_dispatch(),
        epilogue.channel_add.map_or_else(stand_in, Tensor::into_dispatch),
        epilogue.residual.map_or_else(stand_in, Tensor::into_dispatch),
        terms,
        kernel,
        stride,
        padding.0,
        padding.1,
    ))
}

/// Which of the epilogue's terms a launch adds.
#[derive(Clone, Copy, Debug)]
pub struct Terms {
    pub channel_add: bool,
    pub residual: bool,
}

/// burn's convolution and adds.
fn reference(x: Tensor<4>, weight: Tensor<2>, bias: Tensor<1>, kernel: usize, stride: usize, padding: (usize, usize), epilogue: Conv2dEpilogue) -> Tensor<4> {
    let [c_out, row] = weight.dims();
    let weight = weight.reshape([c_out, row / (kernel * kernel), kernel, kernel]);
    let options = ConvOptions { stride: [stride; 2], padding: [padding; 2], dilation: [1; 2], groups: 1 };
    let mut out = burn::tensor::module::conv2d(x, weight, Some(bias), options);
    if let Some(add) = epilogue.channel_add {
        let [n, c] = add.dims();
        out = out + add.reshape([n, c, 1, 1]);
    }
    match epilogue.residual {
        Some(residual) => out + residual,
        None => out,
    }
}

/// `[N, C_out, H_out, W_out]` of a convolution of `x` by `weight`.
pub(super) fn output_shape(x: &Shape, weight: &Shape, kernel: &usize, stride: &usize, pad_begin: &usize, pad_end: &usize) -> Shape {
    let side = |len: usize| (len + pad_begin + pad_end - kernel) / stride + 1;
    Shape::new([x[0], weight[0], side(x[2]), side(x[3])])
}

#[allow(clippy::too_many_arguments)]
pub(super) fn launch(
    x: CubeTensor,
    weight: CubeTensor,
    bias: CubeTensor,
    channel_add: CubeTensor,
    residual: CubeTensor,
    terms: Terms,
    kernel: usize,
    stride: usize,
    pad_begin: usize,
    pad_end: usize,
) -> CubeTensor {
    let x = contiguous(x);
    let shape = output_shape(x.meta.shape(), weight.meta.shape(), &kernel, &stride, &pad_begin, &pad_end);
    let [n, c_out, h_out, w_out] = super::dims::<4>(&shape);
    let out = empty_device_dtype(x.client.clone(), x.device.clone(), shape, x.dtype);
    let client = x.client.clone();
    let items = n * c_out.div_ceil(TILE) * h_out * w_out.div_ceil(TILE);
    let (count, dim) = elementwise(&client, items);
    let weight_type = dtype_to_storage_type(weight.dtype);
    // SAFETY: reads are bounds-checked against the padding and the tile's edges; writes cover
    // only in-range channels and pixels of `out`.
    unsafe {
        shader::conv_tile::launch_unchecked(
            &client,
            count,
            dim,
            x.into_tensor_arg(),
            contiguous(weight).into_tensor_arg(),
            contiguous(bias).into_tensor_arg(),
            contiguous(channel_add).into_tensor_arg(),
            contiguous(residual).into_tensor_arg(),
            out.clone().into_tensor_arg(),
            pad_begin,
            kernel,
            stride,
            terms.channel_add,
            terms.residual,
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
    pub fn conv_tile<W: Float>(
        x: &Tensor<f32>,
        weight: &Tensor<W>,
        bias: &Tensor<f32>,
        channel_add: &Tensor<f32>,
        residual: &Tensor<f32>,
        out: &mut Tensor<f32>,
        pad: usize,
        #[comptime] kernel: usize,
        #[comptime] stride: usize,
        #[comptime] has_channel_add: bool,
        #[comptime] has_residual: bool,
        #[define(W)] _weight: ElemType,
    ) {
        let c_in = x.shape(1);
        let (h_in, w_in) = (x.shape(2), x.shape(3));
        let c_out = out.shape(1);
        let (h_out, w_out) = (out.shape(2), out.shape(3));
        let x_tiles = (w_out + 3) / 4;
        let c_tiles = (c_out + 3) / 4;
        let mut rest = ABSOLUTE_POS;
        let ox0 = (rest % x_tiles) * 4;
        rest /= x_tiles;
        let oy = rest % h_out;
        rest /= h_out;
        let co0 = (rest % c_tiles) * 4;
        let n = rest / c_tiles;
        if n >= out.shape(0) {
            terminate!();
        }

        let mut acc = Array::<f32>::new(16usize);
        #[unroll]
        for i in 0..16usize {
            acc[i] = 0.0f32;
        }
        let taps = kernel * kernel;
        let row = c_in * taps;
        let x_sample = n * c_in * h_in * w_in;
        for ci in 0..c_in {
            let x_channel = x_sample + ci * h_in * w_in;
            #[unroll]
            for ky in 0..kernel {
                let y_padded = oy * stride + ky;
                if y_padded >= pad && y_padded < h_in + pad {
                    let x_row = x_channel + (y_padded - pad) * w_in;
                    #[unroll]
                    for kx in 0..kernel {
                        let tap = ci * taps + ky * kernel + kx;
                        let mut inputs = Array::<f32>::new(4usize);
                        #[unroll]
                        for p in 0..4usize {
                            let x_padded = (ox0 + p) * stride + kx;
                            let mut v = 0.0f32;
                            if x_padded >= pad && x_padded < w_in + pad {
                                v = x[x_row + x_padded - pad];
                            }
                            inputs[p] = v;
                        }
                        #[unroll]
                        for t in 0..4usize {
                            // A channel past the last reads the last row; its sums are never written.
                            let co = min(co0 + t, c_out - 1);
                            let w = f32::cast_from(weight[co * row + tap]);
                            #[unroll]
                            for p in 0..4usize {
                                acc[t * 4 + p] += w * inputs[p];
                            }
                        }
                    }
                }
            }
        }

        #[unroll]
        for t in 0..4usize {
            let co = co0 + t;
            if co < c_out {
                let mut shift = bias[co];
                if has_channel_add {
                    shift += channel_add[n * c_out + co];
                }
                #[unroll]
                for p in 0..4usize {
                    let ox = ox0 + p;
                    if ox < w_out {
                        let at = ((n * c_out + co) * h_out + oy) * w_out + ox;
                        let mut v = acc[t * 4 + p] + shift;
                        if has_residual {
                            v += residual[at];
                        }
                        out[at] = v;
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
    fn equals_burns_convolution() {
        let Some(device) = gpu() else { return };
        // 3×3 same, 1×1, the UNet's stride-2 downsampler, the VAE encoder's right/bottom pad,
        // and sizes that leave partial tiles (5 channels, 7 pixels).
        for (c_in, c_out, side, kernel, stride, padding) in [(6, 8, 8, 3, 1, (1, 1)), (8, 5, 7, 1, 1, (0, 0)), (4, 8, 8, 3, 2, (1, 1)), (3, 4, 9, 3, 2, (0, 1))] {
            let x = random([2, c_in, side, side], &device);
            let weight = random([c_out, c_in * kernel * kernel], &device);
            let bias = random([c_out], &device);
            let plain = |epilogue| conv2d(x.clone(), weight.clone(), bias.clone(), kernel, stride, padding, epilogue);
            let base = reference(x.clone(), weight.clone(), bias.clone(), kernel, stride, padding, Conv2dEpilogue::default());
            let diff = max_diff(plain(Conv2dEpilogue::default()), base.clone());
            assert!(diff < 1e-4, "k{kernel} s{stride} {padding:?}: {diff}");
            if device.supports_dtype(burn::tensor::DType::F16) {
                // An f16 weight is read as it is: the same as widening it first.
                let half = weight.clone().cast(FloatDType::F16);
                let ours = conv2d(x.clone(), half.clone(), bias.clone(), kernel, stride, padding, Conv2dEpilogue::default());
                let widened = reference(x.clone(), half.cast(FloatDType::F32), bias.clone(), kernel, stride, padding, Conv2dEpilogue::default());
                let diff = max_diff(ours, widened);
                assert!(diff < 1e-4, "f16 k{kernel} s{stride}: {diff}");
            }
            let (channel_add, residual) = (random([2, c_out], &device), random(base.dims(), &device));
            let with = |channel_add, residual| Conv2dEpilogue { channel_add: Some(channel_add), residual: Some(residual) };
            let ours = plain(with(channel_add.clone(), residual.clone()));
            let diff = max_diff(ours, reference(x.clone(), weight.clone(), bias.clone(), kernel, stride, padding, with(channel_add, residual)));
            assert!(diff < 1e-4, "epilogue k{kernel} s{stride}: {diff}");
        }
    }
}
