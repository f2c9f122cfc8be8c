//! The compute device: the one limit the engine plans its buffers by, and a GPU with that
//! limit capped, which stands in for a small adapter in tests.
use burn::backend::DispatchDevice;
use burn::tensor::Device;
use burn::tensor::wgpu::{WgpuSetup, wgpu};

/// WebGPU's guaranteed `maxStorageBufferBindingSize`. Burn's CPU backend has no such limit; it
/// is held to this one so that it tiles and refuses sizes as the smallest GPU does.
const GUARANTEED_BINDING_BYTES: u64 = 128 << 20;

/// The most bytes one buffer may hold and one kernel may bind on `device`: the smaller of the
/// adapter's `maxStorageBufferBindingSize` and `maxBufferSize`, as cubecl read them when the
/// device was created. Every tensor the engine keeps or makes must fit it.
pub fn max_binding_bytes(device: &Device) -> u64 {
    match device.as_dispatch() {
        DispatchDevice::Cube(cube) => cube.client().properties().memory.max_page_size,
        _ => GUARANTEED_BINDING_BYTES,
    }
}

/// The default adapter as a device whose `maxStorageBufferBindingSize` and `maxBufferSize` are
/// at most `max_binding` bytes, so that wgpu itself refuses any larger buffer (the CLI's
/// `KILN_TEST_MAX_BINDING_KIB`). cubecl's memory pools need at least 8 MiB.
pub async fn capped_gpu(max_binding: u64) -> Result<Device, String> {
    let instance = wgpu::Instance::default();
    let adapter = instance.request_adapter(&wgpu::RequestAdapterOptions::default()).await.map_err(|e| e.to_string())?;
    let mut limits = adapter.limits();
    limits.max_storage_buffer_binding_size = limits.max_storage_buffer_binding_size.min(max_binding);
    limits.max_buffer_size = limits.max_buffer_size.min(max_binding);
    let descriptor = wgpu::DeviceDescriptor {
        required_features: adapter.features().difference(wgpu::Features::MAPPABLE_PRIMARY_BUFFERS),
        required_limits: limits,
        memory_hints: wgpu::MemoryHints::MemoryUsage,
        ..Default::default()
    };
    let (device, queue) = adapter.request_device(&descriptor).await.map_err(|e| e.to_string())?;
    let backend = adapter.get_info().backend;
    Device::wgpu_options().setup(WgpuSetup { instance, adapter, device, queue, backend }).init().map_err(|e| e.to_string())
}
