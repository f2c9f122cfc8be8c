// The gallery: every result kept in this browser with the settings that made it and a small
// thumbnail. Its own IndexedDB database ("kiln-gallery"), apart from the model cache, so
// neither's version or keys constrain the other; like the cache, only the worker opens it, and
// the page asks for it (`GalleryAsk`). The settings are kept as a share link's query string, so
// an image reopens exactly as its link would.
import type { GalleryAnswers, GalleryAsk } from "./protocol";

export interface GalleryImage {
  id: number;
  /** When it was made (ms since the epoch). */
  created: number;
  /** `toQuery(settings)` of the run that made it. */
  query: string;
  /** The file name it downloads as. */
  name: string;
  png: Blob;
  thumb: Blob;
  width: number;
  height: number;
}

/** Thumbnails fit in a square of this many pixels. */
const THUMB = 160;

let opened: Promise<IDBDatabase> | null = null;

function db(): Promise<IDBDatabase> {
  opened ??= new Promise((resolve, reject) => {
    const req = indexedDB.open("kiln-gallery", 1);
    req.onupgradeneeded = () => req.result.createObjectStore("images", { keyPath: "id", autoIncrement: true });
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
  return opened;
}

/** Runs `step` in one transaction on the images; resolves with its request's result once durable. */
async function images<T>(mode: IDBTransactionMode, step: (store: IDBObjectStore) => IDBRequest<T>): Promise<T> {
  const tx = (await db()).transaction("images", mode);
  const req = step(tx.objectStore("images"));
  return new Promise((resolve, reject) => {
    tx.oncomplete = () => resolve(req.result);
    tx.onabort = tx.onerror = () => reject(tx.error ?? new DOMException("the IndexedDB transaction was aborted", "AbortError"));
  });
}

/** Answers one of the page's asks. */
export async function answerGallery(ask: GalleryAsk): Promise<GalleryAnswers[GalleryAsk["op"]]> {
  switch (ask.op) {
    case "add":
      return addImage(ask.query, ask.name, ask.png);
    case "list":
      return listImages();
    case "delete":
      await images("readwrite", (store) => store.delete(ask.id));
      return null;
    case "clear":
      await images("readwrite", (store) => store.clear());
      return null;
  }
}

/** Keeps a result; fails (QuotaExceededError) when the browser's storage is full. */
async function addImage(query: string, name: string, png: Uint8Array): Promise<GalleryImage> {
  const blob = new Blob([png as BlobPart], { type: "image/png" });
  const { thumb, width, height } = await thumbnail(blob);
  const image: Omit<GalleryImage, "id"> = { created: Date.now(), query, name, png: blob, thumb, width, height };
  const id = await images("readwrite", (store) => store.add(image));
  return { ...image, id: id as number };
}

/** Every kept image, newest first. */
async function listImages(): Promise<GalleryImage[]> {
  return (await images("readonly", (store) => store.getAll() as IDBRequest<GalleryImage[]>)).reverse();
}

async function thumbnail(png: Blob): Promise<{ thumb: Blob; width: number; height: number }> {
  const full = await createImageBitmap(png);
  const { width, height } = full;
  full.close();
  const scale = Math.min(1, THUMB / Math.max(width, height));
  const [w, h] = [Math.max(1, Math.round(width * scale)), Math.max(1, Math.round(height * scale))];
  const small = await createImageBitmap(png, { resizeWidth: w, resizeHeight: h, resizeQuality: "high" });
  const canvas = new OffscreenCanvas(w, h);
  canvas.getContext("2d")!.drawImage(small, 0, 0);
  small.close();
  // WebP where the browser writes it (it falls back to PNG elsewhere).
  return { thumb: await canvas.convertToBlob({ type: "image/webp", quality: 0.85 }), width, height };
}
