// The editing modes' inputs: the init image (from a file, a drop, a paste or a result) and
// the inpainting mask painted over it, both at the image's own size (the engine fits them to
// the output size). A PNG reaches the engine as its own bytes (so the browser equals the CLI
// on the same file), other formats as pixels.
import type { ImageInput, Latents } from "./protocol";

export interface InitImage {
  name: string;
  width: number;
  height: number;
  bitmap: ImageBitmap;
  /** The file's bytes when it is a PNG. */
  png: Uint8Array | null;
  /** An object URL for the preview. */
  url: string;
  /** The latents it was decoded from, when it is this page's result: the latent upscaler
   * takes them instead of encoding it. */
  latents: Latents | null;
}

const PNG_SIGNATURE = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];

/** Decodes any image the browser can read; throws with a readable message otherwise. */
export async function readImage(blob: Blob, name: string): Promise<InitImage> {
  const bytes = new Uint8Array(await blob.arrayBuffer());
  const isPng = PNG_SIGNATURE.every((b, i) => bytes[i] === b);
  let bitmap: ImageBitmap;
  try {
    bitmap = await createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  } catch {
    throw new Error(`${name} is not an image this browser can read`);
  }
  const url = URL.createObjectURL(isPng ? new Blob([bytes], { type: "image/png" }) : blob);
  return { name, width: bitmap.width, height: bitmap.height, bitmap, png: isPng ? bytes : null, url, latents: null };
}

/** `source`'s pixels at its own size. */
function pixels(source: CanvasImageSource, width: number, height: number): ImageData {
  const canvas = new OffscreenCanvas(width, height);
  const ctx = canvas.getContext("2d", { willReadFrequently: true })!;
  ctx.drawImage(source, 0, 0);
  return ctx.getImageData(0, 0, width, height);
}

function rgba(data: ImageData): ImageInput {
  return { rgba: { width: data.width, height: data.height, pixels: new Uint8Array(data.data.buffer) } };
}

/** The image for the engine, at its own size: the engine fits it to the output size. */
export function imageInput(image: InitImage): ImageInput {
  return image.png ? { png: image.png } : rgba(pixels(image.bitmap, image.width, image.height));
}

/**
 * The inpainting mask, painted on a canvas at the image's size over its preview: painted
 * pixels are opaque white (repaint), the rest transparent (keep).
 */
export class MaskEditor {
  brushSize = 32;
  erase = false;
  private readonly ctx: CanvasRenderingContext2D;
  private last: { x: number; y: number } | null = null;

  constructor(readonly canvas: HTMLCanvasElement) {
    this.ctx = canvas.getContext("2d", { willReadFrequently: true })!;
    canvas.addEventListener("pointerdown", (e) => {
      canvas.setPointerCapture(e.pointerId);
      this.last = this.point(e);
      this.paint(this.last, this.last);
    });
    canvas.addEventListener("pointermove", (e) => {
      if (!this.last) return;
      const p = this.point(e);
      this.paint(this.last, p);
      this.last = p;
    });
    for (const end of ["pointerup", "pointercancel"] as const) canvas.addEventListener(end, () => (this.last = null));
  }

  /** A blank mask for a new image. */
  reset(width: number, height: number): void {
    this.canvas.width = width;
    this.canvas.height = height;
  }

  clear(): void {
    this.ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
  }

  /** Swaps repaint and keep (partly painted edges too). */
  invert(): void {
    this.ctx.globalCompositeOperation = "xor";
    this.ctx.fillStyle = "#fff";
    this.ctx.fillRect(0, 0, this.canvas.width, this.canvas.height);
    this.ctx.globalCompositeOperation = "source-over";
  }

  /** The mask as the engine reads it, white on black, at the image's size (fitted with it). */
  pixels(): ImageData {
    const { width: w, height: h } = this.canvas;
    const flat = new OffscreenCanvas(w, h);
    const ctx = flat.getContext("2d")!;
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, w, h);
    ctx.drawImage(this.canvas, 0, 0);
    return pixels(flat, w, h);
  }

  input(): ImageInput {
    return rgba(this.pixels());
  }

  /** The same mask as a PNG, for the CLI's `--mask`. */
  png(): Promise<Blob> {
    const data = this.pixels();
    const canvas = new OffscreenCanvas(data.width, data.height);
    canvas.getContext("2d")!.putImageData(data, 0, 0);
    return canvas.convertToBlob({ type: "image/png" });
  }

  private point(e: PointerEvent): { x: number; y: number } {
    const r = this.canvas.getBoundingClientRect();
    return { x: ((e.clientX - r.left) * this.canvas.width) / r.width, y: ((e.clientY - r.top) * this.canvas.height) / r.height };
  }

  /** A round-ended stroke from `a` to `b` (a dot when they are equal). */
  private paint(a: { x: number; y: number }, b: { x: number; y: number }): void {
    const ctx = this.ctx;
    ctx.globalCompositeOperation = this.erase ? "destination-out" : "source-over";
    ctx.fillStyle = ctx.strokeStyle = "#fff";
    ctx.lineWidth = this.brushSize;
    ctx.lineCap = "round";
    ctx.beginPath();
    ctx.arc(a.x, a.y, this.brushSize / 2, 0, 2 * Math.PI);
    ctx.fill();
    ctx.beginPath();
    ctx.moveTo(a.x, a.y);
    ctx.lineTo(b.x, b.y);
    ctx.stroke();
    ctx.globalCompositeOperation = "source-over";
  }
}
