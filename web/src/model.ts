// What the engine needs from a diffusers-layout repo, by path inside the repo.

/** Configs every model has, handed to the engine whole. */
export const CONFIG_FILES = [
  "model_index.json",
  "scheduler/scheduler_config.json",
  "text_encoder/config.json",
  "unet/config.json",
  "vae/config.json",
];

/**
 * Tokenizer files, each of which a repo may lack: it has vocab.json + merges.txt or
 * tokenizer.json, with or without the two configs. The engine says what is missing.
 */
export const TOKENIZER_FILES = [
  "tokenizer/vocab.json",
  "tokenizer/merges.txt",
  "tokenizer/tokenizer.json",
  "tokenizer/tokenizer_config.json",
  "tokenizer/special_tokens_map.json",
];

/** The x4 upscaler's extra config (how its input image is noised); other pipelines lack it. */
export const UPSCALER_FILES = ["low_res_scheduler/scheduler_config.json"];

/** Weight files without extension: the engine's name for each (`Engine.add_tensor`'s stem). */
export const WEIGHT_STEMS = ["text_encoder/model", "unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model"];

/** A stem's file names, preferred first: the half-precision variant is half the download. */
export function weightVariants(stem: string): string[] {
  return [`${stem}.fp16.safetensors`, `${stem}.safetensors`];
}

/**
 * How a repo's weights are kept in the cache and on the GPU: as published, or converted as
 * they download (docs/packages.md). q8 and q4 stay quantized on the GPU too.
 */
export const PRECISIONS = ["original", "f16", "q8", "q4"] as const;
export type Precision = (typeof PRECISIONS)[number];
