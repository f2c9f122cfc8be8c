// The model and every generation setting live in the page's query string, so the address
// bar is always a share link: opening it restores the same model and settings (not the
// input image or mask, which never leave the device). The last settings are also kept in
// localStorage, for a page opened without them (the installed app, a bookmark of "./").
import { BACKEND_CHOICES, type BackendChoice } from "./backend";
import { LAYOUT, type Precision } from "./model";
import type { Mode, PngInfo } from "./protocol";

export interface Preset {
  id: string;
  label: string;
  url: string;
  steps: number;
  guidance: number;
}

export const PRESETS: Preset[] = [
  { id: "sd-turbo", label: "SD-Turbo", url: "https://huggingface.co/stabilityai/sd-turbo/resolve/main", steps: 1, guidance: 0 },
  { id: "sd15", label: "Stable Diffusion 1.5", url: "https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5/resolve/main", steps: 25, guidance: 7.5 },
  { id: "sd21-base", label: "Stable Diffusion 2.1 base", url: "https://huggingface.co/stabilityai/stable-diffusion-2-1-base/resolve/main", steps: 25, guidance: 7.5 },
  { id: "sdxl-turbo", label: "SDXL-Turbo", url: "https://huggingface.co/stabilityai/sdxl-turbo/resolve/main", steps: 1, guidance: 0 },
  { id: "sdxl", label: "Stable Diffusion XL base 1.0", url: "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main", steps: 25, guidance: 5 },
];

export type { Mode };
export const MODES: Mode[] = LAYOUT.modes;

/** diffusers' default strength: image-to-image keeps some of the image, inpainting starts the masked region from noise. */
export function defaultStrength(mode: Mode): number {
  return mode === "inpaint" ? LAYOUT.default_strength.inpaint : LAYOUT.default_strength.img2img;
}

/** The most images one Generate queues (Automatic1111's limit). */
export const MAX_COUNT = 100;

/** Steps and guidance for a model that is not a preset. */
const CUSTOM_DEFAULTS = { steps: 25, guidance: 7.5 };

export interface Settings {
  model: string;
  /** How a repo's weights are cached and held (a package keeps its own). */
  precision: Precision;
  mode: Mode;
  prompt: string;
  negativePrompt: string;
  seed: number;
  steps: number;
  guidance: number;
  /** Empty: the model's own scheduler. */
  scheduler: string;
  /** null: the model's default size. */
  width: number | null;
  height: number | null;
  /** Image to image and inpainting, in (0, 1]. */
  strength: number;
  /** Image to image and inpainting: how the image is fitted to the output size (the engine's names). */
  resizeMode: string;
  /** Inpainting: the mask's Gaussian blur in pixels. */
  maskBlur: number;
  /** Upscaling: noise added to the image first. */
  noiseLevel: number;
  /** Batch count: images made one after another from seeds seed, seed + 1, … */
  count: number;
  /** Where the engine runs; "auto" unless the address forces one. */
  backend: BackendChoice;
  /** URLs of the LoRA files the prompt may name (`<lora:name:weight>`). */
  loras: string[];
}

/** A model URL without trailing slashes, so one repo has one cache key. */
export function normalizeModelUrl(url: string): string {
  return url.trim().replace(/\/+$/, "");
}

export function presetFor(model: string): Preset | undefined {
  return PRESETS.find((p) => p.url === normalizeModelUrl(model));
}

export function modelDefaults(model: string): { steps: number; guidance: number } {
  return presetFor(model) ?? CUSTOM_DEFAULTS;
}

/** How the queue and the gallery name one image's settings. */
export function caption(s: Settings): string {
  return `${s.prompt.trim() || "(no prompt)"}, seed ${s.seed}`;
}

export function randomSeed(): number {
  return crypto.getRandomValues(new Uint32Array(1))[0];
}

/**
 * Reads settings from a query string; whatever is missing or malformed takes its default, and
 * so does a mode's own setting in a link of another mode (`toQuery` writes only the mode's).
 */
export function fromQuery(search: string): Settings {
  const q = new URLSearchParams(search);
  const model = normalizeModelUrl(q.get("model") ?? "") || PRESETS[0].url;
  const defaults = modelDefaults(model);
  const precision = q.get("precision");
  const mode = MODES.find((m) => m === q.get("mode")) ?? "txt2img";
  const edits = mode === "img2img" || mode === "inpaint";
  const strength = edits ? num(q.get("strength")) : null;
  return {
    model,
    precision: LAYOUT.precisions.find((p) => p === precision) ?? "original",
    mode,
    prompt: q.get("prompt") ?? "",
    negativePrompt: q.get("negative") ?? "",
    seed: int(q.get("seed"), 0, Number.MAX_SAFE_INTEGER) ?? randomSeed(),
    steps: int(q.get("steps"), 1, 1000) ?? defaults.steps,
    guidance: num(q.get("guidance")) ?? defaults.guidance,
    scheduler: LAYOUT.schedulers.find((k) => k === q.get("scheduler")) ?? "",
    width: int(q.get("width"), 8, 4096),
    height: int(q.get("height"), 8, 4096),
    strength: strength !== null && strength > 0 && strength <= 1 ? strength : defaultStrength(mode),
    resizeMode: (edits && LAYOUT.resize_modes.find((m) => m.name === q.get("resize"))?.name) || LAYOUT.resize_modes[0].name,
    maskBlur: mode === "inpaint" ? Math.min(Math.max(num(q.get("mask_blur")) ?? 0, 0), LAYOUT.max_mask_blur) : 0,
    noiseLevel: (mode === "upscale" ? int(q.get("noise_level"), 0, LAYOUT.max_noise_level) : null) ?? LAYOUT.default_noise_level,
    count: int(q.get("count"), 1, MAX_COUNT) ?? 1,
    backend: BACKEND_CHOICES.find((b) => b === q.get("backend")) ?? "auto",
    loras: q.getAll("lora").map(normalizeModelUrl).filter(Boolean),
  };
}

const LAST = "kiln:settings";

/**
 * The settings a page opens with: its address's, or where that names no model, the last ones
 * used in this browser, with whatever the address does say on top.
 */
export function initialSettings(search: string): Settings {
  const q = new URLSearchParams(search);
  if (q.has("model")) return fromQuery(search);
  const last = new URLSearchParams(readLast());
  for (const [key, value] of q) last.set(key, value);
  return fromQuery(last.toString());
}

/** Keeps `s` as the settings the next page without a share link opens with. */
export function rememberSettings(s: Settings): void {
  try {
    localStorage.setItem(LAST, toQuery(s));
  } catch {
    // Storage disabled or full: the address bar still holds the settings.
  }
}

function readLast(): string {
  try {
    return localStorage.getItem(LAST) ?? "";
  } catch {
    return "";
  }
}

export function toQuery(s: Settings): string {
  const q = new URLSearchParams({ model: s.model, prompt: s.prompt });
  if (s.precision !== "original") q.set("precision", s.precision);
  if (s.negativePrompt) q.set("negative", s.negativePrompt);
  q.set("seed", String(s.seed));
  q.set("steps", String(s.steps));
  q.set("guidance", String(s.guidance));
  if (s.scheduler) q.set("scheduler", s.scheduler);
  if (s.width !== null) q.set("width", String(s.width));
  if (s.height !== null) q.set("height", String(s.height));
  // The mode and its own settings; the images themselves stay on the device.
  if (s.mode !== "txt2img") q.set("mode", s.mode);
  if (s.mode === "img2img" || s.mode === "inpaint") q.set("strength", String(s.strength));
  if ((s.mode === "img2img" || s.mode === "inpaint") && s.resizeMode !== LAYOUT.resize_modes[0].name) q.set("resize", s.resizeMode);
  if (s.mode === "inpaint" && s.maskBlur) q.set("mask_blur", String(s.maskBlur));
  if (s.mode === "upscale") q.set("noise_level", String(s.noiseLevel));
  if (s.count !== 1) q.set("count", String(s.count));
  if (s.backend !== "auto") q.set("backend", s.backend);
  for (const url of s.loras) q.append("lora", url);
  return "?" + q.toString();
}

function int(value: string | null, min: number, max: number): number | null {
  const n = num(value);
  return n !== null && Number.isInteger(n) && n >= min && n <= max ? n : null;
}

function num(value: string | null): number | null {
  if (value === null || value.trim() === "") return null;
  const n = Number(value);
  return Number.isFinite(n) ? n : null;
}

/** `current` with what a PNG's parameters set (the engine read them: see `PngInfo`). */
export function fromPngInfo(current: Settings, info: PngInfo): Settings {
  return {
    ...current,
    prompt: info.prompt,
    negativePrompt: info.negative_prompt,
    steps: info.steps ?? current.steps,
    scheduler: info.scheduler ?? current.scheduler,
    guidance: info.guidance ?? current.guidance,
    seed: info.seed ?? current.seed,
    width: info.width ?? current.width,
    height: info.height ?? current.height,
    strength: info.strength ?? current.strength,
  };
}
