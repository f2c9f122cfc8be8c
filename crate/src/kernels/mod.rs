//! The engine's own GPU kernels: each does in one launch what burn's generic ops do in several
//! (a 3×3 convolution with its bias and residual; a group norm with its SiLU; attention as one
//! online-softmax pass), and none waits on a workgroup barrier, which software adapters
//! (SwiftShader, lavapipe) pay dearly for.
//!
//! They run where burn's device is a cubecl one (wgpu natively, WebGPU in the page). Elsewhere
//! (burn's CPU backend) each function computes the same thing with burn's tensor ops: that
//! path is also the reference the kernels are tested against.
mod attention;
mod conv2d;
mod group_norm;
mod layer_norm;
mod linear;

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, DispatchDevice, backend_extension};
use burn::tensor::{Device, Shape};
use burn_cubecl::CubeBackend;
use burn_cubecl::tensor::CubeTensor;

pub use attention::attention;
pub use conv2d::{Conv2dEpilogue, conv2d};
pub use group_norm::group_norm;
pub use layer_norm::layer_norm;
pub use linear::{LinearEpilogue, linear};

/// Whether tensors on `device` take the kernels (else the reference path).
fn on_gpu(device: &Device) -> bool {
    matches!(device.as_dispatch(), DispatchDevice::Cube(_))
}

/// The kernels as a burn backend extension: implemented for cubecl's backend, and deferred like
/// any other op under burn's fusion.
#[backend_extension(Cube, Fusion)]
pub trait KilnKernels: Backend {
    #[fusion(dtype = x, shape = x)]
    fn group_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>, groups: usize, eps: f32, silu: bool) -> FloatTensor<Self>;

    #[fusion(dtype = x, shape = x)]
    fn layer_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>, eps: f32) -> FloatTensor<Self>;

    /// Absent epilogue terms are switched off by their flag and stood in for by `bias` (burn's
    /// fusion defers only ops whose tensors are all present).
    #[fusion(dtype = x, shape = conv2d::output_shape(x, weight, kernel, stride, pad_begin, pad_end))]
    #[allow(clippy::too_many_arguments)]
    fn conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        channel_add: FloatTensor<Self>,
        residual: FloatTensor<Self>,
        terms: conv2d::Terms,
        kernel: usize,
        stride: usize,
        pad_begin: usize,
        pad_end: usize,
    ) -> FloatTensor<Self>;

    /// Absent terms are switched off by their flag and stood in for by `x`.
    #[fusion(dtype = x, shape = linear::output_shape(x, weight, terms))]
    fn linear(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>, residual: FloatTensor<Self>, terms: linear::Terms) -> FloatTensor<Self>;

    #[fusion(dtype = q, shape = q)]
    fn attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, heads: usize, causal: bool) -> FloatTensor<Self>;
}

impl KilnKernels for CubeBackend {
    fn group_norm(x: CubeTensor, weight: CubeTensor, bias: CubeTensor, groups: usize, eps: f32, silu: bool) -> CubeTensor {
        group_norm::launch(x, weight, bias, groups, eps, silu)
    }

    fn layer_norm(x: CubeTensor, weight: CubeTensor, bias: CubeTensor, eps: f32) -> CubeTensor {
        layer_norm::launch(x, weight, bias, eps)
    }

    fn conv2d(
        x: CubeTensor,
        weight: CubeTensor,
        bias: CubeTensor,
        channel_add: CubeTensor,
        residual: CubeTensor,
        terms: conv2d::Terms,
        kernel: usize,
        stride: usize,
        pad_begin: usize,
        pad_end: usize,
    ) -> CubeTensor {
        conv2d::launch(x, weight, bias, channel_add, residual, terms, kernel, stride, pad_begin, pad_end)
    }

    fn linear(x: CubeTensor, weight: CubeTensor, bias: CubeTensor, residual: CubeTensor, terms: linear::Terms) -> CubeTensor {
        linear::launch(x, weight, bias, residual, terms)
    }

    fn attention(q: CubeTensor, k: CubeTensor, v: CubeTensor, heads: usize, causal: bool) -> CubeTensor {
        attention::launch(q, k, v, heads, causal)
    }
}

/// The dims of a shape as the fixed-size array a kernel's launcher wants.
fn dims<const D: usize>(shape: &Shape) -> [usize; D] {
    std::array::from_fn(|i| shape[i])
}

/// Launch geometry for `units` independent work items: 64 per workgroup, which suits both
/// hardware and software adapters (SwiftShader pays per workgroup, and a few per core is best).
fn elementwise(client: &cubecl::client::Client, units: usize) -> (cubecl::CubeCount, cubecl::CubeDim) {
    let cube_dim = cubecl::CubeDim::new_1d(64);
    (cubecl::calculate_cube_count_elemwise(client, units, cube_dim), cube_dim)
}

/// `tensor` contiguous and untiled, as the kernels index it.
fn contiguous(tensor: CubeTensor) -> CubeTensor {
    burn_cubecl::kernel::into_contiguous(burn_cubecl::kernel::untile(tensor))
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Distribution, Tensor};

    /// The GPU device the kernels run on in tests, when this machine has one (lavapipe counts).
    pub fn gpu() -> Option<Device> {
        Device::wgpu_options().init().ok()
    }

    pub fn random<const D: usize>(shape: [usize; D], device: &Device) -> Tensor<D> {
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
    }

    /// The largest absolute difference between two tensors' values.
    pub fn max_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
        assert_eq!(a.dims(), b.dims());
        let (a, b) = (a.into_data().try_to_vec::<f32>().unwrap(), b.into_data().try_to_vec::<f32>().unwrap());
        a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }
}
