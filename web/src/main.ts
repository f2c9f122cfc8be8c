// The page: controls, share links, input images, progress and errors. The engine, the
// downloads and the GPU all live in the worker, which `EngineClient` drives; this thread
// renders what it reports.
import { chooseBackend, type Backend } from "./backend";
import { listItem } from "./dom";
import { EngineClient, modelKey, type EngineEvents, type ModelKeyed } from "./engine-client";
import { bytes, duration } from "./format";
import type { GalleryImage } from "./gallery";
import { GalleryView } from "./gallery-view";
import { MaskEditor, imageInput, readImage, type InitImage } from "./images";
import type { CacheAnswers, DownloadNeeds, DownloadProgress, ErrorKind, FromWorker, GenerateRequest, Latents, ModelInfo, ModelRef, UpscalerInfo } from "./protocol";
import { LAYOUT, type Precision } from "./model";
import { drawPreview, livePreview, setUpPreviewControls } from "./preview";
import { Queue } from "./queue";
import {
  MODES,
  PRESETS,
  defaultStrength,
  fromPngInfo,
  fromQuery,
  initialSettings,
  modelDefaults,
  normalizeModelUrl,
  presetFor,
  randomSeed,
  rememberSettings,
  toQuery,
  type Mode,
  type Settings,
} from "./settings";

const $ = <T extends HTMLElement = HTMLElement>(id: string) => document.getElementById(id) as T;
const ui = {
  form: $<HTMLFormElement>("form"),
  model: $<HTMLSelectElement>("model"),
  precision: $<HTMLSelectElement>("precision"),
  modes: [...document.querySelectorAll<HTMLInputElement>('input[name="mode"]')],
  custom: $("custom"),
  modelUrl: $<HTMLInputElement>("model-url"),
  cacheStatus: $("cache-status"),
  storage: $("storage"),
  remove: $<HTMLButtonElement>("remove"),
  prompt: $<HTMLTextAreaElement>("prompt"),
  negative: $<HTMLTextAreaElement>("negative"),
  loras: $<HTMLTextAreaElement>("loras"),
  seed: $<HTMLInputElement>("seed"),
  randomize: $<HTMLButtonElement>("randomize"),
  steps: $<HTMLInputElement>("steps"),
  guidance: $<HTMLInputElement>("guidance"),
  scheduler: $<HTMLSelectElement>("scheduler"),
  width: $<HTMLInputElement>("width"),
  height: $<HTMLInputElement>("height"),
  count: $<HTMLInputElement>("count"),
  sizeFields: [...document.querySelectorAll<HTMLElement>(".field.size")],
  sizeHelp: $("size-help"),
  editing: $("editing"),
  initImage: $<HTMLInputElement>("init-image"),
  preview: $<HTMLImageElement>("init-preview"),
  initInfo: $("init-info"),
  strengthField: $("strength-field"),
  strength: $<HTMLInputElement>("strength"),
  strengthValue: $<HTMLOutputElement>("strength-value"),
  resizeField: $("resize-field"),
  resizeMode: $<HTMLSelectElement>("resize-mode"),
  maskTools: $("mask-tools"),
  mask: $<HTMLCanvasElement>("mask"),
  brushSize: $<HTMLInputElement>("brush-size"),
  brushSizeValue: $<HTMLOutputElement>("brush-size-value"),
  eraser: $<HTMLInputElement>("eraser"),
  clearMask: $<HTMLButtonElement>("clear-mask"),
  invertMask: $<HTMLButtonElement>("invert-mask"),
  saveMask: $<HTMLButtonElement>("save-mask"),
  maskBlur: $<HTMLInputElement>("mask-blur"),
  upscaleField: $("upscale-field"),
  noiseLevel: $<HTMLInputElement>("noise-level"),
  noiseLevelField: $("noise-level-field"),
  generate: $<HTMLButtonElement>("generate"),
  cancel: $<HTMLButtonElement>("cancel"),
  previewControls: {
    on: $<HTMLInputElement>("live-preview-on"),
    sharp: $<HTMLInputElement>("sharp-preview"),
    decoderField: $("preview-decoder-field"),
    decoder: $<HTMLInputElement>("preview-decoder"),
  },
  pngInfo: $<HTMLInputElement>("png-info"),
  pngUnused: $("png-info-unused"),
  livePreview: $<HTMLCanvasElement>("live-preview"),
  cancelAll: $<HTMLButtonElement>("cancel-all"),
  queue: $<HTMLOListElement>("queue"),
  share: $<HTMLAnchorElement>("share"),
  status: $("status"),
  bar: $<HTMLProgressElement>("bar"),
  files: $("files"),
  error: $("error"),
  warnings: $("warnings"),
  result: $("result"),
  image: $<HTMLImageElement>("image"),
  save: $<HTMLAnchorElement>("save"),
  useResult: $<HTMLButtonElement>("use-result"),
  deleteResult: $<HTMLButtonElement>("delete-result"),
  empty: $("empty"),
  gallery: $<HTMLOListElement>("gallery-list"),
  galleryInfo: $("gallery-info"),
  deleteAll: $<HTMLButtonElement>("delete-all"),
  pageError: $("page-error"),
  backend: $("backend"),
};

const CUSTOM = "custom";

let settings: Settings = initialSettings(location.search);
/** Chosen once, as the page starts. */
let backend: Backend | null = null;
const queue = new Queue(ui.queue, ui.cancelAll);
const gallery = new GalleryView(
  { list: ui.gallery, info: ui.galleryInfo, deleteAll: ui.deleteAll, deleteResult: ui.deleteResult, storage: ui.storage },
  (ask) => engine.askGallery(ask),
  (image) => void openImage(image),
  () => {
    ui.result.hidden = true;
    showEmpty();
  },
);
let imageUrl: string | null = null;
/** The last result, for "Use as input", with its latents when this page made it. */
let result: { png: Uint8Array; name: string; latents: Latents | null } | null = null;
/** The image the editing modes start from. */
let initImage: InitImage | null = null;
const mask = new MaskEditor(ui.mask);

// ---- settings <-> controls <-> address bar ----

function showSettings(s: Settings): void {
  const preset = presetFor(s.model);
  ui.model.value = preset ? preset.id : CUSTOM;
  ui.custom.hidden = !!preset;
  ui.modelUrl.required = !preset;
  if (!preset) ui.modelUrl.value = s.model;
  ui.precision.value = s.precision;
  for (const radio of ui.modes) radio.checked = radio.value === s.mode;
  ui.prompt.value = s.prompt;
  ui.negative.value = s.negativePrompt;
  ui.loras.value = s.loras.join("\n");
  ui.seed.value = String(s.seed);
  ui.steps.value = String(s.steps);
  ui.guidance.value = String(s.guidance);
  fillSchedulers(engine.infoFor(shownModel(s)), s.scheduler);
  ui.width.value = s.width === null ? "" : String(s.width);
  ui.height.value = s.height === null ? "" : String(s.height);
  ui.strength.value = String(s.strength);
  ui.resizeMode.value = s.resizeMode;
  ui.maskBlur.value = String(s.maskBlur);
  ui.noiseLevel.value = String(s.noiseLevel);
  ui.count.value = String(s.count);
  showMode();
}

function readControls(): Settings {
  const preset = PRESETS.find((p) => p.id === ui.model.value);
  const number = (input: HTMLInputElement, fallback: number) => (Number.isFinite(input.valueAsNumber) ? input.valueAsNumber : fallback);
  const size = (input: HTMLInputElement) => (Number.isFinite(input.valueAsNumber) ? input.valueAsNumber : null);
  return {
    model: preset ? preset.url : normalizeModelUrl(ui.modelUrl.value),
    precision: ui.precision.value as Precision,
    mode: MODES.find((m) => ui.modes.some((r) => r.checked && r.value === m)) ?? "txt2img",
    prompt: ui.prompt.value,
    negativePrompt: ui.negative.value,
    seed: number(ui.seed, settings.seed),
    steps: number(ui.steps, settings.steps),
    guidance: number(ui.guidance, settings.guidance),
    scheduler: ui.scheduler.value,
    width: size(ui.width),
    height: size(ui.height),
    strength: number(ui.strength, settings.strength),
    resizeMode: ui.resizeMode.value,
    maskBlur: number(ui.maskBlur, settings.maskBlur),
    noiseLevel: number(ui.noiseLevel, settings.noiseLevel),
    count: number(ui.count, settings.count),
    backend: settings.backend,
    loras: ui.loras.value.split("\n").map(normalizeModelUrl).filter(Boolean),
  };
}

/** Shows the controls the chosen mode uses, with their current values. */
function showMode(): void {
  const mode = readControls().mode;
  const editing = mode === "img2img" || mode === "inpaint";
  ui.editing.hidden = mode === "txt2img";
  ui.strengthField.hidden = !editing;
  ui.strengthValue.value = ui.strength.value;
  ui.maskTools.hidden = mode !== "inpaint";
  ui.mask.hidden = mode !== "inpaint" || !initImage;
  ui.upscaleField.hidden = mode !== "upscale";
  // Upscaling's output is 4× the image; the other editing modes may resize it.
  for (const field of ui.sizeFields) field.hidden = mode === "upscale";
  // A hidden control is not the mode's: disabled, it cannot block Generate with an unseen error.
  ui.maskBlur.disabled = mode !== "inpaint";
  ui.noiseLevel.disabled = mode !== "upscale" || !takesNoiseLevel();
  ui.noiseLevelField.hidden = ui.noiseLevel.disabled;
  ui.width.disabled = ui.height.disabled = mode === "upscale";
  ui.sizeHelp.hidden = ui.resizeField.hidden = !editing;
  showSizeHints();
  showInitInfo();
}

/** A new mode starts from diffusers' defaults for it. */
function changeMode(mode: Mode): void {
  for (const radio of ui.modes) radio.checked = radio.value === mode;
  ui.strength.value = String(defaultStrength(mode));
  settings = readControls();
  showMode();
  publish();
}

function showSizeHints(): void {
  const info = engine.infoFor(shownModel());
  const hint = readControls().mode !== "txt2img" ? "the image's" : info ? `${info.default_size} (model default)` : "model default";
  for (const input of [ui.width, ui.height]) input.placeholder = hint;
}

/** The address bar is the share link; the next page without one opens with these settings too. */
function publish(): void {
  history.replaceState(null, "", toQuery(settings));
  ui.share.href = location.href;
  rememberSettings(settings);
}

function fillSchedulers(info: ModelInfo | null, selected: string): void {
  const names = LAYOUT.schedulers;
  const label = !info ? "Model default" : info.default_scheduler ? `Model default (${info.default_scheduler})` : "Model default (not supported: choose one)";
  const options = [new Option(label, "")];
  for (const name of names) options.push(new Option(name, name));
  ui.scheduler.replaceChildren(...options);
  ui.scheduler.value = names.includes(selected) ? selected : "";
}

/** Sizes and schedulers as the loaded model defines them. */
function applyInfo(info: ModelInfo): void {
  fillSchedulers(info, settings.scheduler);
  for (const input of [ui.width, ui.height]) input.step = input.min = String(info.size_multiple);
  showSizeHints();
  showMode();
}

async function changeModel(): Promise<void> {
  const model = readControls().model;
  const { steps, guidance } = modelDefaults(model);
  await switchTo({ ...settings, model, steps, guidance, scheduler: "", width: null, height: null });
}

/** Shows `next`, whose model may differ, and loads that model if it is cached. */
async function switchTo(next: Settings): Promise<void> {
  settings = next;
  showSettings(settings);
  const info = engine.infoFor(shownModel());
  if (info) applyInfo(info);
  else for (const input of [ui.width, ui.height]) input.step = input.min = "8";
  showSizeHints();
  publish();
  await warmUp();
}

// ---- the model cache ----

function host(url: string): string {
  try {
    return new URL(url).host;
  } catch {
    return url;
  }
}

/** Shows what is cached of the model and, when not all of it, what the download needs before it starts. */
async function showCache(): Promise<boolean> {
  const shown = modelKey(shownModel());
  const status = await askCache("status").catch(() => null);
  // The worker was replaced meanwhile (a crash, another model): its successor will be asked.
  if (!status) return false;
  const complete = status.package ? status.precisions.length > 0 : status.precisions.includes(settings.precision);
  const kept = status.precisions.map((p) => (p === "original" ? "as published" : p)).join(", ");
  const needs = complete ? null : await askCache("needs").catch(() => null);
  // The page moved on to another model meanwhile.
  if (shown !== modelKey(shownModel())) return complete;
  const size = needs ? `${bytes(needs.needed)}${needs.free === null ? "" : `, with ${bytes(needs.free)} of storage free for this site`}` : "";
  ui.cacheStatus.textContent = complete
    ? `Stored in this browser${status.package ? " (a Kiln package)" : ""}: ${kept}, ${bytes(status.bytes)} in all; works offline.`
    : needs?.refusal
      ? `Not downloaded: ${needs.refusal}`
      : status.bytes > 0
        ? `Partly downloaded (${bytes(status.bytes)}); Generate continues the download${size && ` (${size})`}.`
        : `Not downloaded yet; Generate downloads it once from ${host(settings.model)}${size && `: ${size}`}.`;
  ui.remove.disabled = engine.busy || status.bytes === 0;
  showFirstSteps(complete, needs);
  void gallery.showStorage();
  return complete;
}

/** The result area, before there is a result, says what to do. */
function showFirstSteps(cached: boolean, needs: DownloadNeeds | null): void {
  const download = cached ? "" : ` The first time, the model downloads once${needs ? ` (${bytes(needs.needed)})` : ""}; then it stays in this browser and works offline.`;
  ui.empty.textContent = `Type a prompt and press Generate (or Ctrl+Enter).${download} Every image is kept in the gallery below.`;
}

function showEmpty(): void {
  ui.empty.hidden = !ui.result.hidden || engine.state.kind === "generating";
}

/** Loads a fully cached model onto the GPU right away, so the first Generate is quick. */
async function warmUp(): Promise<void> {
  if ((await showCache()) && !engine.busy && !engine.infoFor(shownModel()) && !ui.generate.disabled) {
    ui.remove.disabled = true;
    setStatus("Loading the model from the cache…");
    engine.load(modelRef());
  }
}

async function remove(): Promise<void> {
  try {
    setStatus(`Removed the cached model: ${bytes(await askCache("remove"))} freed.`);
  } catch (e) {
    setStatus((e as Error).message);
  }
  await showCache();
}

// ---- the engine ----

/** The model the controls show, in the precision they show. */
function shownModel(s = settings): ModelKeyed {
  return { base: s.model, precision: s.precision };
}

/** The shown model, on the backend chosen as the page started. */
function modelRef(): ModelRef {
  return { ...shownModel(), backend: backend!.kind };
}

/** Asks about the shown model in the cache. */
function askCache<Q extends keyof CacheAnswers>(question: Q): Promise<CacheAnswers[Q]> {
  return engine.askCache(question, shownModel());
}

/** Asks the engine for the settings in a PNG's parameters text (answered as `pngInfo`). */
async function readPngInfo(file: Blob, name: string): Promise<void> {
  engine.readPngInfo(new Uint8Array(await file.arrayBuffer()), name);
}

const ERROR_TEXT: Record<ErrorKind, (m: string) => string> = {
  download: (m) => `Download failed: ${m}\nPress Generate to try again: an interrupted file continues where it stopped, a corrupt one downloads again.`,
  storage: (m) => m,
  settings: (m) => `These settings do not work with this model: ${m}`,
  model: (m) => `The model could not be loaded: ${m}`,
  "non-finite": (m) => `No image: ${m}.\nThe model's weights may be damaged (remove the model and download it again), or these settings overflow it.`,
  webgpu: (m) => `WebGPU could not start: ${m}`,
  "device-lost": (m) => `${m}\nThe engine restarts and reloads the model from the cache.`,
  crash: (m) => `The engine stopped: ${m}\nPress Generate to restart it; the model reloads from the cache.`,
};

/** How the page shows what the engine reports. */
const reports: EngineEvents = {
  download: showDownload,
  uploading(done, total) {
    progress(done, total);
    setStatus(`Loading the model into GPU memory: ${Math.floor((100 * done) / total)}%`);
  },
  loaded(model, info) {
    ui.files.replaceChildren();
    if (model === modelKey(shownModel())) applyInfo(info);
    if (engine.state.kind !== "generating") finish("Model ready.");
  },
  started({ warnings, total, width, height }) {
    ui.warnings.replaceChildren(...warnings.map((w) => listItem(w)));
    progress(0, total);
    setStatus(`Generating ${[`${width}×${height}`, queue.position()].filter(Boolean).join(", ")}: step 0 of ${total}`);
  },
  step(done, total, preview) {
    progress(done, total);
    setStatus(`Generating${queue.position() && ` ${queue.position()}`}: step ${done} of ${total}`);
    if (preview) drawPreview(ui.livePreview, preview);
  },
  image({ settings: made }, png, latents, seconds) {
    const name = `kiln-${made.seed}.png`;
    showImage(png, name, latents);
    void gallery.keep(toQuery({ ...made, backend: "auto" }), name, png);
    finish(`Done in ${seconds.toFixed(1)} s.`);
  },
  cancelled: () => finish("Cancelled."),
  failed(kind, message) {
    // The queued jobs would most likely fail the same way; their settings are still in the controls.
    queue.clear();
    ui.error.textContent = ERROR_TEXT[kind](message);
    ui.error.hidden = false;
    finish();
    if (kind === "device-lost") void warmUp();
  },
  pngInfo: applyPngInfo,
};
const engine = new EngineClient(reports, shownModel);

function applyPngInfo({ name, info, problem }: Extract<FromWorker, { type: "png-info" }>): void {
  ui.pngUnused.hidden = true;
  if (!info) {
    ui.error.textContent = `No settings read from ${name}: ${problem}`;
    ui.error.hidden = false;
    return;
  }
  ui.error.hidden = true;
  settings = fromPngInfo(readControls(), info);
  showSettings(settings);
  publish();
  ui.pngUnused.querySelector("ul")!.replaceChildren(...info.unused.map(([field, value]) => listItem(`${field}: ${value}`)));
  ui.pngUnused.hidden = info.unused.length === 0;
  if (!engine.busy) setStatus(`Settings read from ${name}.`);
}

// ---- generating ----

/** Queues the controls' settings: Batch count jobs, from seeds seed, seed + 1, … */
function generate(): void {
  if (!backend) return;
  settings = readControls();
  const { mode } = settings;
  ui.initImage.setCustomValidity(mode !== "txt2img" && !initImage ? "Choose an image: a file, or drop or paste one on the page." : "");
  if (!ui.form.reportValidity()) return;
  publish();
  const request = requestFor(settings);
  const ref = modelRef();
  queue.add(Array.from({ length: settings.count }, (_, i) => {
    const seed = settings.seed + i;
    return { settings: { ...settings, seed, count: 1 }, ref, request: { ...request, seed } };
  }));
  if (engine.state.kind !== "generating") startNext();
}

function requestFor(s: Settings): GenerateRequest {
  const { mode } = s;
  const request: GenerateRequest = {
    mode,
    prompt: s.prompt,
    negative_prompt: s.negativePrompt,
    steps: s.steps,
    guidance: s.guidance,
    scheduler: s.scheduler || undefined,
    seed: s.seed,
  };
  if (mode === "txt2img") {
    request.width = s.width ?? undefined;
    request.height = s.height ?? undefined;
  } else {
    request.image = imageInput(initImage!);
  }
  if (mode === "img2img" || mode === "inpaint") {
    // The engine fits the image (and the mask) to Width × Height, or to its own size rounded.
    request.width = s.width ?? undefined;
    request.height = s.height ?? undefined;
    request.resize_mode = s.resizeMode;
    request.strength = s.strength;
  }
  if (mode === "inpaint") {
    request.mask = mask.input();
    request.mask_blur = s.maskBlur;
  }
  if (mode === "upscale" && takesNoiseLevel()) request.noise_level = s.noiseLevel;
  // The latent upscaler takes a result's own latents rather than encoding its pixels again.
  if (mode === "upscale" && initImage?.latents) request.image_latents = initImage.latents;
  return request;
}

/** The loaded model's upscaler, if it is one. */
function upscaler(): UpscalerInfo | undefined {
  return engine.infoFor(shownModel())?.upscaler;
}

/** Whether the model takes a noise level: the x4 upscaler does, the latent one not; a model not
 * loaded yet may (the engine ignores it where it does not apply). */
function takesNoiseLevel(): boolean {
  const info = upscaler();
  return !info || info.max_noise_level !== undefined;
}

/** Sends the queue's next job to the worker, if one waits. */
function startNext(): void {
  const job = queue.start();
  if (!job) return;
  ui.error.hidden = ui.result.hidden = ui.livePreview.hidden = true;
  ui.warnings.replaceChildren();
  const ready = engine.infoFor(job.ref) !== null;
  engine.generate(job, livePreview(ui.previewControls));
  showEmpty();
  ui.remove.disabled = true;
  ui.cancel.disabled = false;
  // Ask the browser not to evict the model under storage pressure.
  void navigator.storage?.persist?.();
  setStatus(ready ? "Starting…" : "Preparing the model…");
}

/** The worker is idle again; `status` is the new progress line. The next queued job starts. */
function finish(status = ""): void {
  ui.livePreview.hidden = true;
  queue.end();
  ui.cancel.disabled = true;
  ui.bar.hidden = true;
  setStatus(status);
  showEmpty();
  void showCache();
  startNext();
}

function showImage(png: Uint8Array, name: string, latents: Latents | null = null): void {
  if (imageUrl) URL.revokeObjectURL(imageUrl);
  imageUrl = URL.createObjectURL(new Blob([png as BlobPart], { type: "image/png" }));
  ui.image.src = ui.save.href = imageUrl;
  ui.save.download = name;
  result = { png, name, latents };
  ui.result.hidden = false;
  showEmpty();
}

/** Shows a gallery image as the result, with the settings that made it (the share link's). */
async function openImage(image: GalleryImage): Promise<void> {
  showImage(new Uint8Array(await image.png.arrayBuffer()), image.name);
  ui.error.hidden = true;
  await switchTo({ ...fromQuery(image.query), backend: settings.backend });
}

// ---- the input image and the mask ----

/** Makes `blob` (with the `latents` it was decoded from, if known) the init image (a
 * text-to-image page switches to image to image). */
async function useImage(blob: Blob, name: string, latents: Latents | null = null): Promise<void> {
  let image: InitImage;
  try {
    image = { ...(await readImage(blob, name)), latents };
  } catch (e) {
    ui.error.textContent = e instanceof Error ? e.message : String(e);
    ui.error.hidden = false;
    return;
  }
  if (initImage) {
    URL.revokeObjectURL(initImage.url);
    initImage.bitmap.close();
  }
  initImage = image;
  ui.preview.src = image.url;
  ui.preview.hidden = false;
  mask.reset(image.width, image.height);
  ui.initImage.setCustomValidity("");
  // The file input names the image, wherever it came from.
  if (ui.initImage.files?.[0] !== blob) {
    const files = new DataTransfer();
    files.items.add(new File([blob], name, { type: blob.type }));
    ui.initImage.files = files.files;
  }
  if (readControls().mode === "txt2img") changeMode("img2img");
  else showMode();
}

function showInitInfo(): void {
  if (!initImage) {
    ui.initInfo.textContent = "";
    return;
  }
  const { name, width, height } = initImage;
  const { mode, width: w, height: h, resizeMode } = readControls();
  const size = `${width}×${height}`;
  const target = `${w ?? width}×${h ?? height}`;
  const label = LAYOUT.resize_modes.find((m) => m.name === resizeMode)?.label;
  ui.initInfo.textContent =
    mode === "upscale"
      ? `${name}: ${size}${upscaledSize(width, height)}.`
      : `${name}: ${size}${target === size ? "" : `, fitted to ${target} (${label})`}.`;
}

/** What an image of `width` × `height` is upscaled to by the loaded upscaler. */
function upscaledSize(width: number, height: number): string {
  const factor = upscaler()?.factor;
  return factor ? `, upscaled to ${factor * width}×${factor * height}` : "";
}

async function saveMask(): Promise<void> {
  if (!initImage) return;
  const link = document.createElement("a");
  link.href = URL.createObjectURL(await mask.png());
  link.download = "mask.png";
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 60_000);
}

// ---- progress ----

/** Stops the running job within a step; the next queued one then starts. */
function cancel(): void {
  if (engine.state.kind !== "generating") return;
  setStatus("Cancelling…");
  engine.cancel();
}

function setStatus(text: string): void {
  ui.status.textContent = text;
}

function progress(done: number, total: number): void {
  ui.bar.hidden = false;
  ui.bar.max = Math.max(total, 1);
  ui.bar.value = done;
}

function showDownload(p: DownloadProgress): void {
  const received = p.files.reduce((sum, f) => sum + f.received, 0);
  const total = p.files.reduce((sum, f) => sum + (f.size ?? f.received), 0);
  progress(received, total);
  const left = p.rate > 0 ? ` · about ${duration((total - received) / p.rate)} left` : "";
  setStatus(`Downloading the model: ${bytes(received)} of ${bytes(total)} · ${bytes(p.rate)}/s${left}`);
  ui.files.replaceChildren(
    ...p.files.map((f) => listItem(`${f.path}: ${f.size !== null && f.received >= f.size ? `${bytes(f.size)}, done` : `${bytes(f.received)} of ${f.size === null ? "?" : bytes(f.size)}`}`)),
  );
}

// ---- start ----

/** How the Precision control names the engine's precisions. */
const PRECISION_LABELS: Record<string, string> = { original: "As published", q8: "q8 (about half the size of f16)", q4: "q4 (about a quarter)" };

function wire(): void {
  ui.model.replaceChildren(...PRESETS.map((p) => new Option(p.label, p.id)), new Option("Custom URL (diffusers repo or Kiln package)…", CUSTOM));
  ui.precision.replaceChildren(...LAYOUT.precisions.map((p) => new Option(PRECISION_LABELS[p] ?? p, p)));
  ui.noiseLevel.max = String(LAYOUT.max_noise_level);
  ui.maskBlur.max = String(LAYOUT.max_mask_blur);
  ui.resizeMode.replaceChildren(...LAYOUT.resize_modes.map((m) => new Option(m.label, m.name)));
  setUpPreviewControls(ui.previewControls);
  ui.form.addEventListener("submit", (e) => {
    e.preventDefault();
    generate();
  });
  ui.form.addEventListener("input", (e) => {
    if (e.target === ui.model || e.target === ui.modelUrl || e.target === ui.precision) return;
    const radio = ui.modes.find((r) => r === e.target);
    if (radio) return changeMode(radio.value as Mode);
    settings = readControls();
    showMode();
    publish();
  });
  ui.initImage.addEventListener("change", () => {
    const file = ui.initImage.files?.[0];
    if (file) void useImage(file, file.name);
  });
  // Drop an image anywhere on the page; other drags (text) keep their usual behaviour.
  const draggingFiles = (e: DragEvent) => !!e.dataTransfer?.types.includes("Files");
  document.addEventListener("dragover", (e) => {
    if (!draggingFiles(e)) return;
    e.preventDefault();
    document.body.classList.add("dragging");
  });
  document.addEventListener("dragleave", (e) => {
    if (!e.relatedTarget) document.body.classList.remove("dragging");
  });
  document.addEventListener("drop", (e) => {
    document.body.classList.remove("dragging");
    if (!draggingFiles(e)) return;
    e.preventDefault();
    const file = e.dataTransfer!.files[0];
    if (file) void useImage(file, file.name);
  });
  // Paste an image anywhere (into the prompt: its settings); pasted text goes where it normally goes.
  document.addEventListener("paste", (e) => {
    const file = [...(e.clipboardData?.files ?? [])].find((f) => f.type.startsWith("image/"));
    if (!file) return;
    e.preventDefault();
    if (e.target === ui.prompt) void readPngInfo(file, file.name || "the pasted image");
    else void useImage(file, file.name || "pasted image");
  });
  // A PNG dropped on the prompt gives its settings, as in Automatic1111.
  ui.prompt.addEventListener("drop", (e) => {
    const file = e.dataTransfer?.files[0];
    if (!file) return;
    e.preventDefault();
    e.stopPropagation();
    document.body.classList.remove("dragging");
    void readPngInfo(file, file.name);
  });
  ui.pngInfo.addEventListener("change", () => {
    const file = ui.pngInfo.files?.[0];
    if (file) void readPngInfo(file, file.name);
    ui.pngInfo.value = "";
  });
  ui.useResult.addEventListener("click", () => {
    if (result) void useImage(new Blob([result.png as BlobPart], { type: "image/png" }), result.name, result.latents);
  });
  ui.brushSize.addEventListener("input", () => {
    mask.brushSize = ui.brushSize.valueAsNumber;
    ui.brushSizeValue.value = ui.brushSize.value;
  });
  ui.eraser.addEventListener("change", () => (mask.erase = ui.eraser.checked));
  ui.clearMask.addEventListener("click", () => mask.clear());
  ui.invertMask.addEventListener("click", () => mask.invert());
  ui.saveMask.addEventListener("click", () => void saveMask());
  ui.model.addEventListener("change", () => {
    ui.custom.hidden = ui.model.value !== CUSTOM;
    ui.modelUrl.required = ui.model.value === CUSTOM;
    if (ui.model.value !== CUSTOM || ui.modelUrl.checkValidity()) void changeModel();
  });
  ui.precision.addEventListener("change", () => {
    settings = readControls();
    publish();
    void warmUp();
  });
  ui.modelUrl.addEventListener("change", () => {
    if (ui.modelUrl.value && ui.modelUrl.checkValidity()) void changeModel();
  });
  ui.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      ui.form.requestSubmit();
    }
  });
  ui.randomize.addEventListener("click", () => {
    ui.seed.value = String(randomSeed());
    settings = readControls();
    publish();
  });
  ui.cancel.addEventListener("click", cancel);
  ui.cancelAll.addEventListener("click", () => {
    queue.clear();
    cancel();
  });
  ui.remove.addEventListener("click", () => void remove());
}

async function main(): Promise<void> {
  wire();
  showSettings(settings);
  publish();
  void gallery.refresh();
  // The app shell (not the model) is cached by the service worker for offline use.
  void navigator.serviceWorker?.register("./sw.js").catch(() => {});
  const chosen = await chooseBackend(settings.backend);
  if ("problem" in chosen) {
    ui.pageError.textContent = chosen.problem;
    ui.pageError.hidden = false;
    ui.generate.disabled = true;
    setStatus("");
    await showCache();
    return;
  }
  backend = chosen;
  ui.backend.textContent = `Backend: ${chosen.label}`;
  setStatus("");
  await warmUp();
}

void main();
