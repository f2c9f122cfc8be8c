// The page side of scripts/bench-web: Kiln's engine and ONNX Runtime Web timed in the same
// browser, on the same inputs. scripts/web/bench.mjs bundles it, serves it and drives it.
import init, { Bench, Engine, Model, is_weight_dtype, safetensors_header, safetensors_header_length } from "kiln-wasm";
import * as ort from "onnxruntime-web/webgpu";
import { LAYOUT } from "../../web/src/model";

/** GPU work counted around each call: compute dispatches and queue submits. */
const counts = { dispatches: 0, submits: 0 };
const count = (proto: object, method: string, key: keyof typeof counts) => {
  const target = proto as Record<string, (...args: unknown[]) => unknown>;
  const original = target[method];
  target[method] = function (this: unknown, ...args: unknown[]) {
    counts[key]++;
    return original.apply(this, args);
  };
};
if (typeof GPUComputePassEncoder !== "undefined") {
  count(GPUComputePassEncoder.prototype, "dispatchWorkgroups", "dispatches");
  count(GPUQueue.prototype, "submit", "submits");
}

/** Calls before timing: V8 runs wasm from its baseline compiler first and optimises the
 * functions that run often, so both engines get their optimised code before the clock starts. */
const WARM_UP = 5;

/** Mean milliseconds of `iters` calls after the warm-up, and the GPU work of the last one. */
async function time(iters: number, call: () => Promise<unknown>) {
  for (let i = 0; i < WARM_UP; i++) await call();
  const start = performance.now();
  for (let i = 0; i < iters; i++) await call();
  const ms = (performance.now() - start) / iters;
  counts.dispatches = counts.submits = 0;
  await call();
  return { ms, dispatches: counts.dispatches, submits: counts.submits };
}

/** A pipeline folder served at `base`, uploaded as the app's worker does. */
async function loadFolder(engine: Engine, base: string): Promise<Model> {
  const loader = engine.loader();
  for (const path of [...LAYOUT.required_files, ...LAYOUT.optional_files]) {
    const response = await fetch(`${base}/${path}`);
    if (response.ok) loader.set_file(path, new Uint8Array(await response.arrayBuffer()));
  }
  for (const { stem, files } of LAYOUT.weight_files) {
    let response;
    for (const file of files) if ((response = await fetch(`${base}/${file}`)).ok) break;
    const bytes = new Uint8Array(await response!.arrayBuffer());
    const header = safetensors_header(bytes.subarray(8, 8 + safetensors_header_length(bytes)));
    for (const t of header.tensors) {
      if (is_weight_dtype(t.dtype)) loader.add_tensor(stem, t.name, t.dtype, Uint32Array.from(t.shape), bytes.subarray(t.begin, t.end));
    }
  }
  return loader.finish(base);
}

/** A TAESD repo served at `base`, as the sharp preview's decoder. */
async function loadPreviewDecoder(model: Model, base: string): Promise<void> {
  const fetched = async (path: string) => {
    const response = await fetch(`${base}/${path}`);
    return response.ok ? new Uint8Array(await response.arrayBuffer()) : null;
  };
  const { config, weight_files } = LAYOUT.preview_decoder;
  for (const file of weight_files) {
    const weights = await fetched(file);
    if (weights) return model.load_preview_decoder(base, (await fetched(config))!, file, weights);
  }
  throw new Error(`${base} has no weight file`);
}

interface KilnOptions {
  /** A folder URL, or a preset name (`sd15`, `sd-turbo`) for random weights. */
  model: string;
  /** A TAESD folder URL: the sharp preview is timed too (folder models only). */
  previewDecoder?: string;
  backend: "webgpu" | "cpu";
  size: number;
  batch: number;
  iters: number;
}

/** Milliseconds per step of a guided generation, steps with and without the live preview
 * alternating in one run, so both see the same machine. The preview is the sharp one when the
 * model holds its decoder. */
async function stepTimes(model: Model, size: number, iters: number) {
  const generation = model.start({ mode: "txt2img", prompt: "a bench", steps: 2 * iters + 1, guidance: 7.5, scheduler: "euler", seed: 1, width: size, height: size });
  generation.step();
  await generation.wait(true);
  const ms = { plain: 0, preview: 0 };
  for (let i = 0; i < 2 * iters; i++) {
    const preview = i % 2 === 1;
    const start = performance.now();
    generation.step();
    await generation.wait(preview);
    ms[preview ? "preview" : "plain"] += (performance.now() - start) / iters;
  }
  generation.free();
  return { step_ms: ms.plain, step_ms_with_preview: ms.preview, preview_cost: (ms.preview - ms.plain) / ms.plain };
}

/** Kiln's three calls; also the UNet call's inputs and output, for the peer to check against. */
async function kiln({ model, previewDecoder, backend, size, batch, iters }: KilnOptions) {
  await init({ module_or_path: new URL("./kiln_bg.wasm", location.href) });
  const engine = await Engine.create(backend);
  let bench: Bench;
  let steps = {};
  if (model.includes("/")) {
    const loaded = await loadFolder(engine, model);
    steps = await stepTimes(loaded, size, 2 * iters);
    if (previewDecoder) {
      await loadPreviewDecoder(loaded, previewDecoder);
      const sharp = await stepTimes(loaded, size, 2 * iters);
      steps = { ...steps, sharp: { step_ms: sharp.step_ms, step_ms_with_preview: sharp.step_ms_with_preview, preview_cost: sharp.preview_cost } };
    }
    bench = loaded.bench(size, batch);
  } else {
    bench = engine.bench_random(model, size, batch);
  }
  const unet = await time(iters, () => bench.call("unet"));
  return {
    ...steps,
    text_encoder_ms: (await time(iters, () => bench.call("text_encoder"))).ms,
    unet_ms_per_call: unet.ms,
    dispatches_per_unet_call: unet.dispatches,
    submits_per_unet_call: unet.submits,
    vae_decode_ms: (await time(iters, () => bench.call("vae_decode"))).ms,
    inputs: { sample: bench.sample(), sampleShape: bench.sample_shape(), context: bench.context(), contextShape: bench.context_shape(), timestep: Bench.timestep() },
    output: await bench.unet_output(),
  };
}

interface OrtOptions {
  onnx: string;
  provider: "webgpu" | "wasm";
  iters: number;
  inputs: Awaited<ReturnType<typeof kiln>>["inputs"];
}

/** ONNX Runtime Web's UNet call on the same inputs, one thread on its wasm provider. */
async function onnxRuntime({ onnx, provider, iters, inputs }: OrtOptions) {
  ort.env.wasm.numThreads = 1;
  const session = await ort.InferenceSession.create(onnx, { executionProviders: [provider] });
  const feeds = {
    sample: new ort.Tensor("float32", Float32Array.from(inputs.sample), Array.from(inputs.sampleShape)),
    timestep: new ort.Tensor("float32", Float32Array.from([inputs.timestep]), [1]),
    encoder_hidden_states: new ort.Tensor("float32", Float32Array.from(inputs.context), Array.from(inputs.contextShape)),
  };
  let output: Float32Array = new Float32Array();
  const call = async () => {
    const result = await session.run(feeds);
    output = (await result.out.getData()) as Float32Array;
  };
  const timed = await time(iters, call);
  await session.release();
  return { unet_ms_per_call: timed.ms, dispatches_per_unet_call: provider === "webgpu" ? timed.dispatches : 0, output };
}

Object.assign(self, { kiln, onnxRuntime, benchReady: true });
