// Where the engine runs: WebGPU on a real GPU, else the CPU in WebAssembly (as ONNX Runtime
// Web's wasm provider does), which is faster than a software GPU adapter and works in browsers
// without WebGPU. `backend=webgpu` or `backend=cpu` in the page's address forces either.

export type BackendChoice = "auto" | "webgpu" | "cpu";
export const BACKEND_CHOICES: BackendChoice[] = ["auto", "webgpu", "cpu"];

export interface Backend {
  kind: "webgpu" | "cpu";
  /** What the page shows after "Backend: ". */
  label: string;
}

const NO_WEBGPU =
  "Kiln needs WebGPU to use this device's GPU, and this browser does not provide it{why}.\n" +
  "WebGPU works in Chrome and Edge 113+ (Windows, macOS, ChromeOS), Chrome 121+ on Android, " +
  "Safari 26+ (macOS, iOS, iPadOS) and Firefox 141+ on Windows. On Linux, Chrome needs " +
  "chrome://flags/#enable-unsafe-webgpu (and on some GPUs #enable-vulkan). " +
  "If it is enabled, chrome://gpu tells whether WebGPU is blocked for this GPU or driver.";

/**
 * The limits the engine's kernels rely on: WebGPU's defaults, which every full ("core")
 * adapter meets but a compatibility-mode one may not. Weight tables larger than one
 * binding stay on the host, so no model needs more.
 */
const REQUIRED_LIMITS = {
  maxBufferSize: 256 << 20,
  maxStorageBufferBindingSize: 128 << 20,
  maxStorageBuffersPerShaderStage: 8,
  maxComputeWorkgroupStorageSize: 16384,
  maxComputeInvocationsPerWorkgroup: 256,
  maxComputeWorkgroupSizeX: 256,
  maxComputeWorkgroupSizeY: 256,
} as const;

const CPU_LABEL = "CPU (WebAssembly SIMD, one thread)";

/** Why WebGPU cannot run the engine here, or the adapter it would run on. */
async function probeWebGpu(): Promise<{ problem: string } | { adapter: GPUAdapter }> {
  if (!navigator.gpu) return { problem: NO_WEBGPU.replace("{why}", " (navigator.gpu is missing)") };
  const adapter = await navigator.gpu.requestAdapter().catch(() => null);
  if (!adapter) return { problem: NO_WEBGPU.replace("{why}", " (it found no usable GPU adapter)") };
  const short = Object.entries(REQUIRED_LIMITS).filter(([name, needed]) => adapter.limits[name as keyof typeof REQUIRED_LIMITS] < needed);
  if (short.length === 0) return { adapter };
  const limits = short.map(([name, needed]) => `${name} is ${adapter.limits[name as keyof typeof REQUIRED_LIMITS]}, and Kiln needs ${needed}`);
  return { problem: `This GPU's WebGPU limits are too small for Kiln:\n${limits.join("\n")}` };
}

/** "WebGPU (google swiftshader, software adapter)". */
function webgpuLabel(adapter: GPUAdapter): string {
  const { vendor, architecture, description } = adapter.info;
  const name = [vendor, architecture].filter(Boolean).join(" ") || description || "unknown adapter";
  return `WebGPU (${name}${adapter.info.isFallbackAdapter ? ", software adapter" : ""})`;
}

/**
 * The backend for `choice`. "auto" takes WebGPU when the adapter is a real GPU that meets the
 * limits, else the CPU, saying why; a forced WebGPU that cannot run is a `problem`.
 */
export async function chooseBackend(choice: BackendChoice): Promise<Backend | { problem: string }> {
  if (choice === "cpu") return { kind: "cpu", label: CPU_LABEL };
  const probe = await probeWebGpu();
  if (choice === "webgpu") return "problem" in probe ? probe : { kind: "webgpu", label: webgpuLabel(probe.adapter) };
  if ("problem" in probe) return { kind: "cpu", label: `${CPU_LABEL}: no usable WebGPU here` };
  if (probe.adapter.info.isFallbackAdapter) return { kind: "cpu", label: `${CPU_LABEL}: the only WebGPU adapter is a software one (${webgpuLabel(probe.adapter)})` };
  return { kind: "webgpu", label: webgpuLabel(probe.adapter) };
}
