// The engine's wasm-bindgen module (crate/src/web/), built by scripts/build and bundled
// into worker.js under this name. Typed by hand so the page type-checks without a wasm build.
declare module "kiln-wasm" {
  export default function init(options: { module_or_path: URL }): Promise<unknown>;
  export function png_info(png: Uint8Array): import("./generated/PngInfo").PngInfo;

  export function lora_tags(prompt: string): import("./generated/LoraTag").LoraTag[];
  export function pipeline_family(modelIndex: Uint8Array, base: string): import("./generated/FamilyFiles").FamilyFiles;
  export function package_manifest(bytes: Uint8Array, label: string): import("./generated/PackageManifest").PackageManifest;
  export function safetensors_header_length(first8: Uint8Array): number;
  export function safetensors_header(json: Uint8Array): import("./generated/SafetensorsHeader").SafetensorsHeader;
  export function is_weight_dtype(dtype: string): boolean;
  export function stored_format(name: string, shape: Uint32Array, format: string): string;
  export function convert(name: string, dtype: string, shape: Uint32Array, bytes: Uint8Array, stored: string): Uint8Array;

  /** The device, created once; a loader per model. */
  export class Engine {
    static create(backend: "webgpu" | "cpu"): Promise<Engine>;
    loader(): Loader;
  }

  /** A model's files and tensors as they stream in; `finish` consumes it. */
  export class Loader {
    set_file(path: string, bytes: Uint8Array): void;
    add_lora(name: string, bytes: Uint8Array, scale: number): void;
    add_tensor(stem: string, name: string, dtype: string, shape: Uint32Array, bytes: Uint8Array): void;
    add_stored(stem: string, name: string, format: string, shape: Uint32Array, bytes: Uint8Array): void;
    finish(model_name: string): Model;
    free(): void;
  }

  /** A loaded model. */
  export class Model {
    info(): import("./generated/ModelInfo").ModelInfo;
    load_preview_decoder(name: string, config: Uint8Array, weight_path: string, weights: Uint8Array): void;
    drop_preview_decoder(): void;
    start(request: import("./generated/GenerateRequest").GenerateRequest): Generation;
    free(): void;
  }

  /** A generation in progress; freeing it cancels it, `finish` consumes it. */
  export class Generation {
    info(): import("./generated/Started").Started;
    step(): number;
    finished(): boolean;
    wait(preview: boolean): Promise<import("./generated/Preview").Preview | undefined>;
    finish(): Promise<import("./generated/Finished").Finished>;
    free(): void;
  }

  /** SHA-256 whose state is saved with a download's chunks (crate/src/web/sha256.rs). */
  export class Sha256 {
    constructor();
    static restore(state: Uint8Array): Sha256;
    update(bytes: Uint8Array): void;
    save(): Uint8Array;
    hex(): string;
  }
}

// The engine's `layout()` (crate/src/layout.rs), as JSON: scripts/web/bundle.mjs writes it
// from the built wasm module and bundles it under this name; its type is generated from Rust.
declare module "kiln-layout" {
  const layout: import("./generated/Layout").Layout;
  export default layout;
}
