// The engine's wasm-bindgen module (crate/src/web/), built by scripts/build and bundled
// into worker.js under this name. Typed by hand so the page type-checks without a wasm build.
declare module "kiln-wasm" {
  export default function init(options: { module_or_path: URL }): Promise<unknown>;
  export function png_info(png: Uint8Array): import("./protocol").PngInfo;

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
    add_tensor(stem: string, name: string, dtype: string, shape: Uint32Array, bytes: Uint8Array): void;
    add_stored(stem: string, name: string, format: string, shape: Uint32Array, bytes: Uint8Array): void;
    finish(model_name: string): Model;
    free(): void;
  }

  /** A loaded model. */
  export class Model {
    info(): Omit<import("./protocol").ModelInfo, "precision">;
    load_preview_decoder(name: string, config: Uint8Array, weight_path: string, weights: Uint8Array): void;
    drop_preview_decoder(): void;
    start(request: import("./protocol").GenerateRequest): Generation;
    free(): void;
  }

  /** A generation in progress; freeing it cancels it, `finish` consumes it. */
  export class Generation {
    info(): import("./protocol").Started;
    step(): number;
    finished(): boolean;
    wait(preview: boolean): Promise<import("./protocol").Preview | undefined>;
    finish(): Promise<Uint8Array>;
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
// from the built wasm module and bundles it under this name.
declare module "kiln-layout" {
  const layout: {
    required_files: string[];
    optional_files: string[];
    weight_files: { stem: string; files: string[] }[];
    manifest: string;
    preview_decoder: { config: string; weight_files: string[] };
    precisions: string[];
    schedulers: string[];
    default_strength: { img2img: number; inpaint: number };
    default_noise_level: number;
    max_noise_level: number;
    max_mask_blur: number;
    resize_modes: { name: string; label: string }[];
  };
  export default layout;
}
