// The editing modes' inputs: the init image (from a file, a drop, a paste or a result) and
// the inpainting mask painted over it. What reaches the engine is a PNG's own bytes when
// nothing has to change (so the browser equals the CLI on the same file), else pixels.
import type { ImageInput } from "./protocol";

export interface InitImage {
  name: string;
  width: number;
  height: number;
  bitmap: ImageBitmap;
  /** The file's bytes when it is a PNG. */
  png: Uint8Array | null;
  /** An object URL for the preview. */
  url: string;
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
  return { name, width: bitmap.width, height: bitmap.height, bitmap, png: isPng ? bytes : null, url };
}

/**
 * `source` scaled to cover `width`×`height` and cropped to its centre, as pixels. At the
 * source's own size it is a plain copy.
 */
function fitted(source: CanvasImageSource, sw: number, sh: number, width: number, height: number): ImageData {
  const canvas = new OffscreenCanvas(width, height);
  const ctx = canvas.getContext("2d", { willReadFrequently: true })!;
  const scale = Math.max(width / sw, height / sh);
  const [cw, ch] = [width / scale, height / scale];
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(source, (sw - cw) / 2, (sh - ch) / 2, cw, ch, 0, 0, width, height);
  return ctx.getImageData(0, 0, width, height);
}

function rgba(data: ImageData): ImageInput {
  return { rgba: { width: data.width, height: data.height, pixels: new Uint8Array(data.data.buffer) } };
}

/** The image at `width`×`height` (null: its own size). */
export function imageInput(image: InitImage, width: number | null, height: number | null): ImageInput {
  const [w, h] = [width ?? image.width, height ?? image.height];
  if (image.png && w === image.width && h === image.height) return { png: image.png };
  return rgba(fitted(image.bitmap, image.width, image.height, w, h));
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

  /** The mask as the engine reads it, white on black, fitted to `width`×`height` as the image is. */
  pixels(width: number | null, height: number | null): ImageData {
    const { width: w, height: h } = this.canvas;
    const flat = new OffscreenCanvas(w, h);
    const ctx = flat.getContext("2d")!;
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, w, h);
    ctx.drawImage(this.canvas, 0, 0);
    return fitted(flat, w, h, width ?? w, height ?? h);
  }

  input(width: number | null, height: number | null): ImageInput {
    return rgba(this.pixels(width, height));
  }

  /** The same mask as a PNG, for the CLI's `--mask`. */
  png(width: number | null, height: number | null): Promise<Blob> {
    const data = this.pixels(width, height);
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
