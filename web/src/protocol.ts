// Messages between the page (main.ts) and the engine's worker (worker.ts).
import type { Backend } from "./backend";
import type { GalleryImage } from "./gallery";
import type { Precision } from "./model";
import type { Mode } from "./settings";

/** An image for the engine: a PNG file's own bytes (decoded as the CLI decodes files), or a canvas's pixels. */
export type ImageInput = { png: Uint8Array } | { rgba: { width: number; height: number; pixels: Uint8Array } };

export interface GenerateRequest {
  mode: Mode;
  prompt: string;
  negative_prompt?: string;
  steps?: number;
  guidance?: number;
  scheduler?: string;
  width?: number;
  height?: number;
  seed: number;
  /** The init image (image to image, inpaint) or the image to upscale. */
  image?: ImageInput;
  /** Inpainting: white is repainted, black kept; the image's size. */
  mask?: ImageInput;
  strength?: number;
  /** How the image is fitted to width × height: the engine's names (`LAYOUT.resize_modes`). */
  resize_mode?: string;
  mask_blur?: number;
  noise_level?: number;
}

/** What `Model.info` reports about the loaded model, and the precision its weights are in. */
export interface ModelInfo {
  default_size: number;
  size_multiple: number;
  /** null when the model's own scheduler is not one the engine has: the user must pick one. */
  default_scheduler: string | null;
  precision: Precision;
}

export interface Started {
  total: number;
  width: number;
  height: number;
  warnings: string[];
}

/** The image as it forms: one pixel per latent pixel, for the page to scale up. */
export interface Preview {
  width: number;
  height: number;
  rgba: Uint8ClampedArray;
}

export interface FileProgress {
  path: string;
  received: number;
  size: number | null;
}

export interface DownloadProgress {
  files: FileProgress[];
  /** Bytes per second over the last few seconds. */
  rate: number;
}

/** What downloading a model still takes, before anything of it is fetched. */
export interface DownloadNeeds {
  /** Bytes the files will take in storage. */
  needed: number;
  free: number | null;
  /** The message Generate would refuse with; null when it fits. */
  refusal: string | null;
}

export interface CacheStatus {
  bytes: number;
  /** A Kiln package (its precision is its own), rather than a diffusers repo. */
  package: boolean;
  /** The precisions the model is completely cached in (a package: its own format). */
  precisions: Precision[];
}

/**
 * Questions about the model cache, which only the worker opens: how much of a model is
 * stored, what its download needs (answered with HEAD requests, nothing stored), and its
 * removal (the bytes freed).
 */
export interface CacheAnswers {
  status: CacheStatus;
  needs: DownloadNeeds;
  remove: number;
}

/** What the page asks of the gallery, which only the worker opens (`gallery.ts`). */
export type GalleryAsk = { op: "add"; query: string; name: string; png: Uint8Array } | { op: "list" } | { op: "delete"; id: number } | { op: "clear" };

/** The gallery's answer to each ask. */
export interface GalleryAnswers {
  add: GalleryImage;
  list: GalleryImage[];
  delete: null;
  clear: null;
}

/** The image as it forms: not shown (null), A1111's approximation, or decoded by the TAESD repo at `decoder`. */
export type LivePreview = { decoder: string | null } | null;

/** Which model the worker should hold, and where its engine runs. */
export interface ModelRef {
  base: string;
  precision: Precision;
  backend: Backend["kind"];
}

export type ToWorker =
  | ({ type: "load" } & ModelRef)
  | ({ type: "generate"; request: GenerateRequest; preview: LivePreview } & ModelRef)
  | { type: "cancel" }
  | { type: "png-info"; png: Uint8Array; name: string }
  | { type: "cache"; id: number; question: keyof CacheAnswers; base: string; precision: Precision }
  | { type: "gallery"; id: number; ask: GalleryAsk };

/** What the engine's `png_info` reads from a PNG's `parameters` text (Kiln's or A1111's). */
export interface PngInfo {
  prompt: string;
  negative_prompt: string;
  steps?: number;
  /** As Kiln names schedulers (A1111's sampler names mapped). */
  scheduler?: string;
  guidance?: number;
  seed?: number;
  width?: number;
  height?: number;
  strength?: number;
  /** Fields Kiln has no setting for, or could not read, as written. */
  unused: [string, string][];
}

/**
 * - download: a file failed (network, 404, corrupt); nothing bad was kept, a retry continues.
 * - storage: not enough space. - settings: `start` refused them. - model: the files do not make a model.
 * - webgpu: no usable device.
 * - device-lost / crash: the worker is unusable; the page replaces it.
 */
export type ErrorKind = "download" | "storage" | "settings" | "model" | "non-finite" | "webgpu" | "device-lost" | "crash";

export type FromWorker =
  | { type: "download"; progress: DownloadProgress }
  | { type: "uploading"; done: number; total: number }
  | { type: "loaded"; base: string; info: ModelInfo }
  | { type: "started"; started: Started }
  | { type: "step"; done: number; total: number; preview?: Preview }
  | { type: "image"; png: Uint8Array }
  | { type: "cancelled" }
  | { type: "png-info"; name: string; info: PngInfo | null; problem?: string }
  | { type: "cache"; id: number; answer?: CacheAnswers[keyof CacheAnswers]; problem?: string }
  | { type: "gallery"; id: number; answer?: GalleryAnswers[keyof GalleryAnswers]; problem?: string }
  | { type: "error"; kind: ErrorKind; message: string };
