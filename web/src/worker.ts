// The engine's Web Worker: downloads a model into the cache, streams its tensors from the
// cache to the GPU, and runs generations one step at a time so the page sees progress and
// a cancel lands within one step. The page replaces the whole worker after a crash or a
// lost device, since the wasm module cannot be trusted after either.
import init, { Engine, type Generation, type Loader, type Model, convert as convertTensor, is_weight_dtype, lora_tags, png_info, stored_format } from "kiln-wasm";
import { CorruptDownload, download, downloadConverted, type Converter } from "./download";
import { answerGallery } from "./gallery";
import { NetworkError, NotFound } from "./host";
import { checkSpace, downloadNeeds, modelStatus, planModel, planPreviewDecoder, removeModel, type PackageManifest, type PlannedFile } from "./plan";
import { StorageShort, StoredFile, discardDamaged, getRecord, keyOf, openStored, storedPath } from "./store";
import type { LoraTag } from "./generated/LoraTag";
import type { CacheAnswers, ErrorKind, FileProgress, FromWorker, GenerateRequest, ModelRef, ToWorker } from "./protocol";
import { WEIGHT_STEMS } from "./model";
import { PreviewPacer } from "./pacer";

const scope = self as unknown as DedicatedWorkerGlobalScope;

function post(msg: FromWorker, transfer: Transferable[] = []): void {
  scope.postMessage(msg, transfer);
}

/** An error the page should show as `kind`. */
class Failure extends Error {
  constructor(readonly kind: ErrorKind, message: string) {
    super(message);
  }
}

/** `e` as a `kind` failure, unless it is a trap: that stays a crash whatever call it hit. */
function failure(kind: ErrorKind, e: unknown, prefix = ""): unknown {
  return e instanceof WebAssembly.RuntimeError ? e : new Failure(kind, prefix + describe(e));
}

// burn creates the GPUDevice inside wasm, out of JavaScript's reach. Wrapping requestDevice
// lets the worker watch the device's `lost` promise and tell the page at once.
if (typeof GPUAdapter !== "undefined") {
  const requestDevice = GPUAdapter.prototype.requestDevice;
  GPUAdapter.prototype.requestDevice = async function (this: GPUAdapter, descriptor?: GPUDeviceDescriptor) {
    const device = await requestDevice.call(this, descriptor);
    device.lost.then((info) => post({ type: "error", kind: "device-lost", message: `The GPU device was lost (${info.message || info.reason}).` }));
    return device;
  };
}

let engine: Engine | null = null;
let model: Model | null = null;
/** The model loaded: base URL and the precision asked for. */
let loaded: string | null = null;
/** The sharp preview's decoder the model holds: its repo's base URL. */
let previewDecoder: string | null = null;
let tasks: Promise<void> = Promise.resolve();
let current: AbortController | null = null;
/**
 * Bumped by a cancel and by a failure, each of which ends what the page asked for so far:
 * tasks queued before it (a Generate pressed while the model was warming up) are dropped.
 */
let epoch = 0;

scope.onmessage = (event: MessageEvent<ToWorker>) => {
  const msg = event.data;
  if (msg.type === "png-info") {
    void readPngInfo(msg.png, msg.name);
    return;
  }
  if (msg.type === "cache") {
    void answerCache(msg);
    return;
  }
  if (msg.type === "gallery") {
    answerGallery(msg.ask).then(
      (answer) => post({ type: "gallery", id: msg.id, answer }),
      (e) => post({ type: "gallery", id: msg.id, problem: describe(e) }),
    );
    return;
  }
  if (msg.type === "cancel") {
    epoch++;
    current?.abort();
    return;
  }
  const asked = epoch;
  tasks = tasks.then(() => (asked === epoch ? run(msg) : undefined));
};

/**
 * Set when the browser refused a GPU kernel: every result computed since may be wrong, so the
 * run in progress fails instead of showing an image.
 */
let kernelFailure: string | null = null;
/** A crash was reported: the page replaces this worker, and what fails after is its echo. */
let crashed = false;

function crash(message: string): void {
  if (crashed) return;
  crashed = true;
  post({ type: "error", kind: "crash", message });
}

// console_error_panic_hook prints a Rust panic through console.error just before the
// module traps: report the crash right there, with the panic's own message, whether the
// trap then lands in a task's catch or in an engine future. A kernel the browser refused to
// compile (the engine logs it, naming the kernel) is a crash too.
const consoleError = console.error;
console.error = (...args: unknown[]) => {
  consoleError.apply(console, args);
  const text = args.map(String).join(" ");
  if (text.includes("compilation failed for kernel")) {
    kernelFailure ??= text.split("\n")[0];
    crash(kernelFailure);
  } else if (text.includes("panicked at")) crash(text.split("\n\nStack:")[0]);
};
scope.onunhandledrejection = (event) => crash(describe(event.reason));
// A trap inside a GPU callback is uncaught here; reported once, by this worker, it does not
// also reach the page, where it would replace the panic's message with "unreachable".
scope.addEventListener("error", (event: ErrorEvent) => {
  event.preventDefault();
  crash(event.message);
});

async function run(msg: Exclude<ToWorker, { type: "cancel" | "png-info" | "cache" | "gallery" }>): Promise<void> {
  const abort = (current = new AbortController());
  try {
    // The prompt's LoRA tags are read by the engine, so it is loaded first.
    if (msg.type === "generate") await loadWasm();
    await ensureModel(msg, msg.type === "generate" ? loraPicks(msg.request.prompt, msg.loras) : [], abort.signal);
    if (msg.type === "generate") {
      await ensurePreviewDecoder(msg.preview?.decoder ?? null, abort.signal);
      await generate(msg.request, msg.preview !== null, abort.signal);
    }
  } catch (e) {
    if (abort.signal.aborted) post({ type: "cancelled" });
    else {
      epoch++;
      const kind = kindOf(e);
      if (kind === "crash") crash(describe(e));
      else post({ type: "error", kind, message: describe(e) });
    }
  } finally {
    current = null;
  }
}

function kindOf(e: unknown): ErrorKind {
  if (e instanceof Failure) return e.kind;
  if (e instanceof StorageShort) return "storage";
  if (e instanceof CorruptDownload || e instanceof NetworkError || e instanceof NotFound) return "download";
  // A trap (a Rust panic aborts the module) leaves the wasm instance unusable.
  if (e instanceof WebAssembly.RuntimeError) return "crash";
  return "model";
}

function describe(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

let wasm: Promise<unknown> | null = null;
/** Instantiates the wasm module once, whoever asks first. */
const loadWasm = () => (wasm ??= init({ module_or_path: new URL("./kiln_bg.wasm", import.meta.url) }));

/** Answered at once, even while a generation runs: it needs no model. */
async function readPngInfo(png: Uint8Array, name: string): Promise<void> {
  await loadWasm();
  try {
    post({ type: "png-info", name, info: png_info(png) });
  } catch (e) {
    post({ type: "png-info", name, info: null, problem: describe(e) });
  }
}

/** Answered at once, even while a model downloads: the model cache is this thread's alone. */
async function answerCache({ id, question, base, precision }: Extract<ToWorker, { type: "cache" }>): Promise<void> {
  // The engine reads stored package manifests and safetensors headers.
  await loadWasm();
  const answers: { [Q in keyof CacheAnswers]: () => Promise<CacheAnswers[Q]> } = {
    status: () => modelStatus(base),
    needs: () => downloadNeeds(base, precision),
    remove: () => removeModel(base),
  };
  try {
    post({ type: "cache", id, answer: await answers[question]() });
  } catch (e) {
    post({ type: "cache", id, problem: describe(e) });
  }
}

async function createEngine(backend: ModelRef["backend"]): Promise<Engine> {
  await loadWasm();
  try {
    return await Engine.create(backend);
  } catch (e) {
    throw failure("webgpu", e);
  }
}

/** A LoRA the prompt names: the URL of its file, its name there and its weight. */
interface LoraPick {
  url: string;
  name: string;
  weight: number;
}

/** A LoRA file's name in the prompt: its file name without `.safetensors`. */
function loraName(url: string): string {
  return url.slice(url.lastIndexOf("/") + 1).replace(/\.safetensors$/, "");
}

/** The LoRAs `prompt` names (`<lora:name:weight>`, read by the engine), each found among `urls`. */
function loraPicks(prompt: string, urls: string[]): LoraPick[] {
  let tags: LoraTag[];
  try {
    tags = lora_tags(prompt);
  } catch (e) {
    throw failure("settings", e);
  }
  const odd = urls.find((u) => !u.endsWith(".safetensors"));
  if (odd && tags.length) throw new Failure("settings", `LoRA files are .safetensors URLs; “${odd}” is not one.`);
  return tags.map(({ name, weight }) => {
    const url = urls.find((u) => loraName(u) === name);
    if (!url) throw new Failure("settings", `The prompt names LoRA “${name}”, which is not among the LoRA files (${urls.map(loraName).join(", ") || "none given"}).`);
    return { url, name, weight };
  });
}

async function ensureModel({ base, precision, backend }: ModelRef, loras: LoraPick[], signal: AbortSignal): Promise<void> {
  const key = `${base}#${precision}` + loras.map((l) => ` ${l.url}:${l.weight}`).join("");
  if (loaded === key) return;
  engine ??= await createEngine(backend);
  // The old model's GPU memory is freed before the new one's tensors arrive.
  model?.free();
  [model, loaded, previewDecoder] = [null, null, null];
  const damaged = await discardDamaged(base);
  if (damaged.length) console.warn(`Kiln: ${damaged.join(", ")} lost stored chunks and will be downloaded again`);
  const plan = await planModel(base, precision, signal);
  const needed = plan.files.filter((f) => !f.absent);
  if (needed.some((f) => !f.complete)) {
    await checkSpace(needed);
    await downloadAll(base, needed, signal);
  }
  const files = await Promise.all(needed.map((f) => openStored(base, storedPath(f))));
  const loraFiles = await Promise.all(loras.map((l) => cachedLora(l, signal)));
  const loader = engine.loader();
  try {
    loras.forEach((l, i) => loader.add_lora(l.name, loraFiles[i], l.weight));
    if (plan.manifest) await uploadPackage(loader, plan.manifest, files, signal);
    else await upload(loader, files, signal);
  } catch (e) {
    loader.free();
    throw e;
  }
  model = loader.finish(plan.manifest?.name ?? base);
  loaded = key;
  post({ type: "loaded", base, info: { ...model.info(), precision: plan.precision } });
}

/** The bytes of a LoRA's file, downloaded into the cache the first time like a model's files. */
async function cachedLora({ url }: LoraPick, signal: AbortSignal): Promise<Uint8Array> {
  const cut = url.lastIndexOf("/");
  const [base, path] = [url.slice(0, cut), url.slice(cut + 1)];
  const record = await getRecord(keyOf(base, path));
  if (!record?.complete) await downloadAll(base, [{ path, size: null, received: record?.received ?? 0, complete: false }], signal);
  return (await openStored(base, path)).all();
}

/**
 * Gives the engine the sharp preview's decoder from the TAESD repo at `base` (downloaded into
 * the cache like a model's files the first time), or takes it away for null.
 */
async function ensurePreviewDecoder(base: string | null, signal: AbortSignal): Promise<void> {
  if (base === previewDecoder) return;
  model!.drop_preview_decoder();
  previewDecoder = null;
  if (!base) return;
  const files = await planPreviewDecoder(base);
  if (files.some((f) => !f.complete)) await downloadAll(base, files, signal);
  const [config, weights] = await Promise.all(files.map((f) => openStored(base, f.path)));
  try {
    model!.load_preview_decoder(base, await config.all(), weights.record.path, await weights.all());
  } catch (e) {
    throw failure("model", e, "The sharp preview's decoder: ");
  }
  previewDecoder = base;
}

/** Converts one safetensors tensor for the cache in the engine's formats (see docs/packages.md). */
const convert: Converter = (t, bytes, precision) => {
  if (!is_weight_dtype(t.dtype)) return null;
  const shape = Uint32Array.from(t.shape);
  const format = stored_format(t.name, shape, precision);
  return { format, bytes: convertTensor(t.name, t.dtype, shape, bytes, format) };
};

/** Downloads what is missing, one file at a time, reporting every file and the rate. */
async function downloadAll(base: string, plan: PlannedFile[], signal: AbortSignal): Promise<void> {
  const progress: FileProgress[] = plan.map((f) => ({ path: f.path, received: f.received, size: f.size }));
  const samples: { t: number; bytes: number }[] = [];
  let lastPost = 0;
  const report = (force: boolean) => {
    const now = performance.now();
    if (!force && now - lastPost < 250) return;
    lastPost = now;
    const bytes = progress.reduce((sum, f) => sum + f.received, 0);
    samples.push({ t: now, bytes });
    while (samples.length > 2 && now - samples[0].t > 5000) samples.shift();
    const dt = (now - samples[0].t) / 1000;
    post({ type: "download", progress: { files: progress, rate: dt > 0 ? (bytes - samples[0].bytes) / dt : 0 } });
  };
  report(true);
  for (const [i, file] of plan.entries()) {
    if (file.complete) continue;
    const onProgress = (n: number) => {
      progress[i].received = n;
      report(false);
    };
    const record = file.convert
      ? await downloadConverted(base, file.path, file.convert, convert, signal, onProgress)
      : await download(base, file.path, signal, onProgress, file.sha256);
    progress[i] = { path: file.path, received: record.received, size: record.received };
    report(true);
  }
}

/** Hands the small files to the loader and streams every tensor from the cache to the GPU. */
async function upload(loader: Loader, files: StoredFile[], signal: AbortSignal): Promise<void> {
  const weights = [];
  for (const file of files) {
    if (file.record.converted) weights.push({ file, header: null });
    else if (file.record.path.endsWith(".safetensors")) weights.push({ file, header: await file.safetensorsHeader() });
    else loader.set_file(file.record.path, await file.all());
  }
  // Converted files count their converted bytes; originals their file bytes.
  const size = (f: StoredFile) => f.record.converted?.tensors.reduce((sum, t) => sum + t.length, 0) ?? f.record.received;
  const progress = uploadProgress(weights.reduce((sum, w) => sum + size(w.file), 0));
  for (const { file, header } of weights) {
    const stem = WEIGHT_STEMS.find((s) => file.record.path.startsWith(`${s}.`))!;
    for (const t of file.record.converted?.tensors ?? []) {
      if (signal.aborted) throw new Error("cancelled");
      const bytes = (await file.chunk(t.chunk)).subarray(t.offset, t.offset + t.length);
      loader.add_stored(stem, t.name, t.format, Uint32Array.from(t.shape), bytes);
      progress(t.length);
    }
    for (const t of header?.tensors ?? []) {
      if (signal.aborted) throw new Error("cancelled");
      if (is_weight_dtype(t.dtype)) {
        loader.add_tensor(stem, t.name, t.dtype, Uint32Array.from(t.shape), await file.read(t.begin, t.end));
      }
      progress(t.end - t.begin);
    }
  }
  progress(Infinity);
}

/** A package: its embedded files, then every tensor, read across the shards it spans. */
async function uploadPackage(loader: Loader, manifest: PackageManifest, files: StoredFile[], signal: AbortSignal): Promise<void> {
  const encoder = new TextEncoder();
  for (const [path, text] of Object.entries(manifest.files)) loader.set_file(path, encoder.encode(text));
  const shards = manifest.shards.map((s) => files.find((f) => f.record.path === s.path)!);
  const progress = uploadProgress(manifest.tensors.reduce((sum, t) => sum + t.length, 0));
  for (const t of manifest.tensors) {
    if (signal.aborted) throw new Error("cancelled");
    const bytes = new Uint8Array(t.length);
    let [shard, offset, filled] = [t.shard, t.offset, 0];
    while (filled < t.length) {
      const take = Math.min(t.length - filled, (shards[shard]?.record.received ?? 0) - offset);
      if (take <= 0) throw new Error(`tensor ${t.name} runs past the end of the package's shards`);
      bytes.set(await shards[shard].read(offset, offset + take), filled);
      [shard, offset, filled] = [shard + 1, 0, filled + take];
    }
    loader.add_stored(t.file, t.name, t.format, Uint32Array.from(t.shape), bytes);
    progress(t.length);
  }
  progress(Infinity);
}

/** Reports upload progress to the page at most every 250 ms; `Infinity` reports the end. */
function uploadProgress(total: number): (bytes: number) => void {
  let done = 0;
  let lastPost = 0;
  return (bytes) => {
    done = Math.min(total, done + bytes);
    if (bytes === Infinity || performance.now() - lastPost > 250) {
      lastPost = performance.now();
      post({ type: "uploading", done, total });
    }
  };
}

async function generate(request: GenerateRequest, preview: boolean, signal: AbortSignal): Promise<void> {
  let generation: Generation;
  try {
    generation = model!.start(request);
  } catch (e) {
    throw failure("settings", e);
  }
  const started = generation.info();
  post({ type: "started", started });
  const pacer = new PreviewPacer(preview, previewDecoder !== null);
  let finishing = false;
  try {
    while (!generation.finished()) {
      if (signal.aborted) throw new Error("cancelled");
      const begun = performance.now();
      const done = generation.step();
      const previewed = pacer.wanted() && !generation.finished();
      const image = await generation.wait(previewed);
      pacer.took(performance.now() - begun, previewed);
      if (kernelFailure) throw new Error(kernelFailure);
      post({ type: "step", done, total: started.total, preview: image }, image ? [image.rgba.buffer] : []);
    }
    finishing = true;
    const { png, latents } = await generation.finish();
    if (kernelFailure) throw new Error(kernelFailure);
    post({ type: "image", png, latents }, [png.buffer]);
  } catch (e) {
    // Freed here, a generation that did not finish is cancelled (`finish` consumed the other).
    if (!finishing) generation.free();
    if (signal.aborted) throw e;
    // NaN or Inf in the weights or an overflow: the engine is sound, the model or the settings are not.
    if (e instanceof Error && e.name === "NonFinite") throw failure("non-finite", e);
    // Otherwise past `start` a failure is the GPU's or the engine's, and leaves its state unknown.
    throw failure("crash", e, "Generation failed: ");
  }
}
