// Messages between the page (main.ts) and the engine's worker (worker.ts). What the engine
// itself takes and gives is generated from its Rust types (crate/src/messages.rs) into
// ./generated/, and re-exported here.
import type { Backend } from "./backend";
import type { GalleryImage } from "./gallery";
import type { ModelInfo as EngineModelInfo } from "./generated/ModelInfo";
import type { Precision } from "./model";
import type { GenerateRequest } from "./generated/GenerateRequest";
import type { Latents } from "./generated/Latents";
import type { PngInfo } from "./generated/PngInfo";
import type { Preview } from "./generated/Preview";
import type { Started } from "./generated/Started";

export type { GenerateRequest, Latents, PngInfo, Preview, Started };
export type { ImageInput } from "./generated/ImageInput";
export type { Mode } from "./generated/Mode";
export type { UpscalerInfo } from "./generated/UpscalerInfo";
export type { Finished } from "./generated/Finished";

/** What the engine's `Model.info` reports about the loaded model, and the precision its weights are in. */
export type ModelInfo = EngineModelInfo & { precision: Precision };

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
  | ({ type: "generate"; request: GenerateRequest; preview: LivePreview; loras: string[] } & ModelRef)
  | { type: "cancel" }
  | { type: "png-info"; png: Uint8Array; name: string }
  | { type: "cache"; id: number; question: keyof CacheAnswers; base: string; precision: Precision }
  | { type: "gallery"; id: number; ask: GalleryAsk };

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
  | { type: "image"; png: Uint8Array; latents: Latents }
  | { type: "cancelled" }
  | { type: "png-info"; name: string; info: PngInfo | null; problem?: string }
  | { type: "cache"; id: number; answer?: CacheAnswers[keyof CacheAnswers]; problem?: string }
  | { type: "gallery"; id: number; answer?: GalleryAnswers[keyof GalleryAnswers]; problem?: string }
  | { type: "error"; kind: ErrorKind; message: string };
