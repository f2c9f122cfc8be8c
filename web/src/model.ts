// The engine's facts about a model's files and the settings' defaults and limits
// (crate/src/layout.rs), read from the wasm module when the page is bundled; nothing here
// restates them.
import layout from "kiln-layout";

export const LAYOUT = layout;

/** How a repo's weights are kept in the cache and on the GPU: one of `LAYOUT.precisions`. */
export type Precision = string;

/** A weight file stem's file names, preferred first. */
export function weightVariants(stem: string): string[] {
  const entry = LAYOUT.weight_files.find((w) => w.stem === stem);
  if (!entry) throw new Error(`no weight file ${stem}`);
  return entry.files;
}

/** The stems of a pipeline's weight files (`Engine.add_tensor`'s names). */
export const WEIGHT_STEMS = LAYOUT.weight_files.map((w) => w.stem);
