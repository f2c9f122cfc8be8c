// Model files in IndexedDB, as the worker keeps them (it is the only thread that opens this
// database). Store "files": one FileRecord per `${base}/${path}`. Store "chunks": the bytes,
// CHUNK at a time, keyed [fileKey, index]. A chunk and the record counting it are written in
// one transaction, so the record never claims bytes that are not stored. Files are read back
// piece by piece, so no whole weight file is ever held in memory.
import { safetensors_header, safetensors_header_length } from "kiln-wasm";
import type { SafetensorsHeader as Header } from "./generated/SafetensorsHeader";
import { storageFull } from "./quota";
import type { Precision } from "./model";

/** Bytes per stored chunk: a resumed download repeats at most this much. */
export const CHUNK = 4 << 20;

export interface FileRecord {
  key: string;
  base: string;
  path: string;
  /** As the host states it; null when it does not say. */
  size: number | null;
  /** Bytes of the file stored; of a converted file, the source bytes converted so far. */
  received: number;
  chunkSize: number;
  /** The SHA-256 the host states for the file (hex), if any. */
  sha256: string | null;
  /** The host's name for this version of the file: a resume must get the same one. */
  etag: string | null;
  /** The SHA-256 state of the stored bytes so far (the engine's `Sha256.save`), while the file is incomplete. */
  hash: Uint8Array | null;
  /** Verified. Nothing reads an incomplete file except the verification itself. */
  complete: boolean;
  /** The host has no such file (an optional one): known, so an offline start need not ask. */
  absent?: true;
  /** A weight file kept converted: its source header, and where each converted tensor is stored. */
  converted?: { header: Header | null; tensors: ConvertedTensor[]; chunks: number };
}

/** One tensor of a converted weight file: stored in chunk `chunk` at `offset`. */
export interface ConvertedTensor {
  name: string;
  format: string;
  shape: number[];
  chunk: number;
  offset: number;
  length: number;
}

/** Not enough storage for the download. */
export class StorageShort extends Error {}

let opened: Promise<IDBDatabase> | null = null;

function db(): Promise<IDBDatabase> {
  opened ??= new Promise((resolve, reject) => {
    const req = indexedDB.open("kiln", 1);
    req.onupgradeneeded = () => {
      req.result.createObjectStore("files", { keyPath: "key" });
      req.result.createObjectStore("chunks");
    };
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
  return opened;
}

function result<T>(req: IDBRequest<T>): Promise<T> {
  return new Promise((resolve, reject) => {
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

/** Runs `fill` in one read-write transaction over both stores; resolves once it is durable. */
export async function write(fill: (files: IDBObjectStore, chunks: IDBObjectStore) => void): Promise<void> {
  const tx = (await db()).transaction(["files", "chunks"], "readwrite");
  fill(tx.objectStore("files"), tx.objectStore("chunks"));
  const failed = await new Promise<DOMException | null>((resolve) => {
    tx.oncomplete = () => resolve(null);
    tx.onabort = tx.onerror = () => resolve(tx.error ?? new DOMException("the IndexedDB transaction was aborted", "AbortError"));
  });
  if (failed?.name === "QuotaExceededError") throw new StorageShort(await storageFull());
  if (failed) throw failed;
}

/** What to say when a write hit the quota: the numbers, and that nothing stored is lost. */

export function chunkRange(key: string): IDBKeyRange {
  return IDBKeyRange.bound([key, 0], [key, Infinity]);
}

export async function getRecord(key: string): Promise<FileRecord | undefined> {
  return result((await db()).transaction("files").objectStore("files").get(key));
}

export async function discard(key: string): Promise<void> {
  await write((files, chunks) => {
    files.delete(key);
    chunks.delete(chunkRange(key));
  });
}

/** Every record stored for one model (not those of a model whose base lies under its own). */
export async function recordsOf(base: string): Promise<FileRecord[]> {
  const range = IDBKeyRange.bound(`${base}/`, `${base}/\uffff`);
  const records: FileRecord[] = await result((await db()).transaction("files").objectStore("files").getAll(range));
  return records.filter((r) => r.base === base);
}

/**
 * Discards the model's verified files whose chunks are not all stored (evicted or damaged
 * storage), so the next plan fetches them again; returns their paths.
 */
export async function discardDamaged(base: string): Promise<string[]> {
  const records = (await recordsOf(base)).filter((r) => r.complete && !r.absent);
  const store = (await db()).transaction("chunks").objectStore("chunks");
  const counts = await Promise.all(records.map((r) => result(store.count(chunkRange(r.key)))));
  const damaged = records.filter((r, i) => counts[i] !== (r.converted ? r.converted.chunks : Math.ceil(r.received / r.chunkSize)));
  for (const r of damaged) await discard(r.key);
  return damaged.map((r) => r.path);
}

/** The cache key of `path` of a model, kept converted to `convert` when given. */
export function keyOf(base: string, path: string, convert?: Precision): string {
  return `${base}/${storedPath({ path, convert })}`;
}

/** Bytes a record holds in the cache. */
export function storedBytes(r: FileRecord): number {
  return r.converted ? r.converted.tensors.reduce((sum, t) => sum + t.length, 0) : r.received;
}

/** The path a planned file is stored under (its cache key after `${base}/`). */
export function storedPath(file: { path: string; convert?: Precision }): string {
  return file.convert ? `${file.path}#${file.convert}` : file.path;
}

/** Reads byte ranges of a stored file, keeping the last chunk so sequential reads fetch each once. */
export class StoredFile {
  private last: { index: number; bytes: Uint8Array } | null = null;

  constructor(readonly record: FileRecord) {}

  async read(begin: number, end: number): Promise<Uint8Array> {
    if (end > this.record.received) throw new Error(`${this.record.path}: read past the stored ${this.record.received} bytes`);
    const size = this.record.chunkSize;
    const first = Math.floor(begin / size);
    if (end <= (first + 1) * size) return (await this.chunk(first)).subarray(begin - first * size, end - first * size);
    const out = new Uint8Array(end - begin);
    for (let i = first; i * size < end; i++) {
      const from = Math.max(begin, i * size);
      const to = Math.min(end, (i + 1) * size);
      out.set((await this.chunk(i)).subarray(from - i * size, to - i * size), from - begin);
    }
    return out;
  }

  async all(): Promise<Uint8Array> {
    return this.read(0, this.record.received);
  }

  async safetensorsHeader(): Promise<Header> {
    const n = safetensors_header_length(await this.read(0, 8));
    if (8 + n > this.record.received) throw new Error(`the header claims ${n} bytes, more than the file holds`);
    return safetensors_header(await this.read(8, 8 + n));
  }

  /** One stored chunk (of a converted file: a run of whole converted tensors). */
  async chunk(index: number): Promise<Uint8Array> {
    if (this.last?.index !== index) {
      const store = (await db()).transaction("chunks").objectStore("chunks");
      const bytes: Uint8Array | undefined = await result(store.get([this.record.key, index]));
      if (!bytes) throw new Error(`${this.record.path}: chunk ${index} is missing from the cache`);
      this.last = { index, bytes };
    }
    return this.last.bytes;
  }
}

/** A stored, verified file. */
export async function openStored(base: string, path: string): Promise<StoredFile> {
  const rec = await getRecord(keyOf(base, path));
  if (!rec?.complete || rec.absent) throw new Error(`${base}/${path} is not in the cache`);
  return new StoredFile(rec);
}
