// The live preview: its controls (on or off; sharp, decoded by a TAESD repo the user names),
// remembered in localStorage apart from the share link's settings, and its canvas. The
// engine's approximate preview has one pixel per latent pixel, which CSS scales up with
// smoothing, so it costs the page one small putImageData per step.
import { normalizeModelUrl } from "./settings";
import type { LivePreview, Preview } from "./protocol";

/** madebyollin's TAESD for SD 1.x and 2.x, in diffusers' layout. */
export const DEFAULT_DECODER = "https://huggingface.co/madebyollin/taesd/resolve/main";
const KEY = "kiln:live-preview";

export interface PreviewControls {
  on: HTMLInputElement;
  sharp: HTMLInputElement;
  decoderField: HTMLElement;
  decoder: HTMLInputElement;
}

/** Restores the controls' last state and keeps it as the user changes them. */
export function setUpPreviewControls(ui: PreviewControls): void {
  const saved = readSaved();
  ui.on.checked = saved.on;
  ui.sharp.checked = saved.sharp;
  ui.decoder.value = saved.decoder;
  const changed = () => {
    ui.decoderField.hidden = !ui.sharp.checked;
    ui.decoder.required = ui.sharp.checked;
    try {
      localStorage.setItem(KEY, JSON.stringify({ on: ui.on.checked, sharp: ui.sharp.checked, decoder: ui.decoder.value }));
    } catch {
      // Storage refused (private mode, full): the controls still work for this visit.
    }
  };
  for (const input of [ui.on, ui.sharp, ui.decoder]) input.addEventListener("change", changed);
  changed();
}

function readSaved(): { on: boolean; sharp: boolean; decoder: string } {
  const fallback = { on: true, sharp: false, decoder: DEFAULT_DECODER };
  try {
    const saved = JSON.parse(localStorage.getItem(KEY) ?? "null");
    if (typeof saved?.on !== "boolean" || typeof saved.sharp !== "boolean" || typeof saved.decoder !== "string") return fallback;
    return saved;
  } catch {
    return fallback;
  }
}

/** The preview a generation asks the worker for. */
export function livePreview(ui: PreviewControls): LivePreview {
  if (!ui.on.checked) return null;
  return { decoder: ui.sharp.checked && ui.decoder.value.trim() ? normalizeModelUrl(ui.decoder.value) : null };
}

export function drawPreview(canvas: HTMLCanvasElement, preview: Preview): void {
  canvas.width = preview.width;
  canvas.height = preview.height;
  canvas.getContext("2d")!.putImageData(new ImageData(new Uint8ClampedArray(preview.rgba), preview.width, preview.height), 0, 0);
  canvas.hidden = false;
}
