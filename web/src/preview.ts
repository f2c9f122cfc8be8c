// The image as it forms: the engine's preview (one pixel per latent pixel) drawn into a canvas
// that CSS scales up with smoothing, so it costs the page one small putImageData per step.
import type { Preview } from "./protocol";

export function drawPreview(canvas: HTMLCanvasElement, preview: Preview): void {
  canvas.width = preview.width;
  canvas.height = preview.height;
  canvas.getContext("2d")!.putImageData(new ImageData(new Uint8ClampedArray(preview.rgba), preview.width, preview.height), 0, 0);
  canvas.hidden = false;
}
