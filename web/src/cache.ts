// Model files in IndexedDB: streamed in as they download, resumed with HTTP Range after a
// reload or a lost connection, verified before they are marked complete, and read back
// piece by piece so no whole weight file is ever held in memory.
//
// Store "files": one FileRecord per `${base}/${path}`. Store "chunks": the bytes, CHUNK at
// a time, keyed [fileKey, index]. A chunk and the record counting it are written in one
// transaction, so the record never claims bytes that are not stored.
//
// A model is a diffusers repo or a Kiln package (docs/packages.md: manifest.json and shards,
// each checked against the manifest's SHA-256). A repo's weights can be kept converted (f16,
// q8, q4): each tensor is converted as soon as its bytes have arrived and only the converted
// bytes are stored, under `${path}#${precision}`; the original file is never stored whole.
import { headerLength, parseHeader, type Header, type TensorEntry } from "./safetensors";
import { Sha256, type Sha256State } from "./sha256";
import { bytes } from "./format";
import { LAYOUT, WEIGHT_STEMS, weightVariants, type Precision } from "./model";

/** Bytes per stored chunk: a resumed download repeats at most this much. */
const CHUNK = 4 << 20;
/** Attempts per file when the connection drops; each continues where the last stopped. */
const ATTEMPTS = 4;

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
  /** The digest of the stored bytes so far, while the file is incomplete. */
  hash: Sha256State | null;
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

/** A Kiln package's manifest.json (docs/packages.md). */
export interface PackageManifest {
  kiln_package: number;
  name: string;
  format: Precision;
  shard_size: number;
  files: Record<string, string>;
  shards: { path: string; length: number; sha256: string }[];
  tensors: { file: string; name: string; shape: number[]; format: string; shard: number; offset: number; length: number }[];
}

/** Encodes one tensor for storage; null for tensors the engine does not read (integer buffers). */
export type Converter = (tensor: TensorEntry, bytes: Uint8Array, precision: Precision) => { format: string; bytes: Uint8Array } | null;

/** A file that arrived but failed verification. It has been discarded. */
export class CorruptDownload extends Error {}
/** The host has no such file (HTTP 404). */
export class NotFound extends Error {}
/** The connection failed or dropped; what was stored is kept for the next attempt. */
export class NetworkError extends Error {}
/** Not enough storage for the download. */
export class StorageShort extends Error {}

// ---- IndexedDB ----

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
async function write(fill: (files: IDBObjectStore, chunks: IDBObjectStore) => void): Promise<void> {
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
async function storageFull(): Promise<string> {
  const { quota, usage } = (await navigator.storage?.estimate?.()) ?? {};
  const numbers = quota !== undefined && usage !== undefined ? `: ${bytes(usage)} used of the ${bytes(quota)} it allows` : "";
  return `The browser's storage for this site is full${numbers}. Free disk space or remove other cached models, then press Generate: the download continues where it stopped.`;
}

function chunkRange(key: string): IDBKeyRange {
  return IDBKeyRange.bound([key, 0], [key, Infinity]);
}

async function getRecord(key: string): Promise<FileRecord | undefined> {
  return result((await db()).transaction("files").objectStore("files").get(key));
}

async function discard(key: string): Promise<void> {
  await write((files, chunks) => {
    files.delete(key);
    chunks.delete(chunkRange(key));
  });
}

/** Every record stored for one model (not those of a model whose base lies under its own). */
async function recordsOf(base: string): Promise<FileRecord[]> {
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
function keyOf(base: string, path: string, convert?: Precision): string {
  return `${base}/${storedPath({ path, convert })}`;
}

/** Bytes a record holds in the cache. */
function storedBytes(r: FileRecord): number {
  return r.converted ? r.converted.tensors.reduce((sum, t) => sum + t.length, 0) : r.received;
}

// ---- reading ----

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
    const n = headerLength(await this.read(0, 8));
    if (8 + n > this.record.received) throw new Error(`the header claims ${n} bytes, more than the file holds`);
    return parseHeader(await this.read(8, 8 + n));
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

// ---- what a model needs ----

export interface PlannedFile {
  /** The repo path; a converted file is stored under `${path}#${convert}`. */
  path: string;
  size: number | null;
  received: number;
  complete: boolean;
  absent?: true;
  /** The SHA-256 the file must have (a package's shards). */
  sha256?: string;
  /** The precision a weight file is converted to as it arrives. */
  convert?: Precision;
}

export interface ModelPlan {
  /** A package's manifest; null for a diffusers repo. */
  manifest: PackageManifest | null;
  /** What the weights are kept as: the package's format, or the precision asked for. */
  precision: Precision;
  files: PlannedFile[];
}

/** The path a planned file is stored under (its cache key after `${base}/`). */
export function storedPath(file: { path: string; convert?: Precision }): string {
  return file.convert ? `${file.path}#${file.convert}` : file.path;
}

/**
 * The files to load for a model, which of them still need downloading, and their sizes. A
 * repo's weights are planned in `precision`; a package (its manifest.json answers) comes as
 * it was packed. The manifest itself is fetched here, as the shards are only known from it.
 * A `dry` plan stores nothing (not the manifest, nor which optional files the host lacks):
 * it tells what a download would take before one is asked for.
 */
export async function planModel(base: string, precision: Precision, signal: AbortSignal, dry = false): Promise<ModelPlan> {
  const stored = new Map((await recordsOf(base)).map((r) => [r.key, r]));
  const plan = async (path: string, convert?: Precision): Promise<PlannedFile> => {
    const rec = stored.get(keyOf(base, path, convert));
    if (rec?.complete) return { path, size: rec.size, received: rec.received, complete: true, absent: rec.absent, convert };
    return { path, size: await remoteSize(`${base}/${path}`), received: rec?.received ?? 0, complete: false, convert };
  };
  const optional = async (path: string): Promise<PlannedFile> => {
    try {
      return await plan(path);
    } catch (e) {
      if (!(e instanceof NotFound)) throw e;
      const rec: FileRecord = { key: keyOf(base, path), base, path, size: 0, received: 0, chunkSize: CHUNK, sha256: null, etag: null, hash: null, complete: true, absent: true };
      if (!dry) await write((files) => files.put(rec));
      return { path, size: 0, received: 0, complete: true, absent: true };
    }
  };
  const manifestFile = await optional(MANIFEST);
  if (!manifestFile.absent) {
    const raw = dry && !manifestFile.complete ? await fetchBytes(`${base}/${MANIFEST}`, signal) : await new StoredFile(await download(base, MANIFEST, signal, () => {})).all();
    const manifest = parseManifest(raw, base);
    const shards = manifest.shards.map(async (shard) => ({ ...(await plan(shard.path)), sha256: shard.sha256 }));
    const stored = { path: MANIFEST, size: raw.length, received: raw.length, complete: true };
    return { manifest, precision: manifest.format, files: [stored, ...(await Promise.all(shards))] };
  }
  const convert = precision === "original" ? undefined : precision;
  const weight = async (stem: string): Promise<PlannedFile> => {
    const variants = weightVariants(stem);
    // A variant already (partly) stored wins, so a resume or an offline start needs no probe.
    const key = (v: string) => keyOf(base, v, convert);
    const cached = variants.find((v) => stored.get(key(v))?.complete) ?? variants.find((v) => stored.has(key(v)));
    if (cached) return plan(cached, convert);
    for (const path of variants) {
      try {
        return await plan(path, convert);
      } catch (e) {
        if (!(e instanceof NotFound)) throw e;
      }
    }
    throw new NotFound(`${base} has neither ${variants.join(" nor ")}`);
  };
  const files = await Promise.all([...LAYOUT.required_files.map((p) => plan(p)), ...LAYOUT.optional_files.map(optional), ...WEIGHT_STEMS.map(weight)]);
  return { manifest: null, precision, files };
}

const MANIFEST = LAYOUT.manifest;

/** The manifest, checked as `kiln` checks it (crate/src/package.rs) before any of it is used. */
function parseManifest(bytes: Uint8Array, base: string): PackageManifest {
  const bad = (why: string) => new CorruptDownload(`${base}/${MANIFEST}: ${why}`);
  let manifest: PackageManifest;
  try {
    manifest = JSON.parse(new TextDecoder().decode(bytes));
  } catch {
    throw bad("not valid JSON");
  }
  if (manifest?.kiln_package !== 1) throw bad(`package version ${manifest?.kiln_package} is not 1, the one this Kiln reads`);
  const count = (n: unknown) => Number.isSafeInteger(n) && (n as number) >= 0;
  if (!count(manifest.shard_size) || !Array.isArray(manifest.shards) || !Array.isArray(manifest.tensors) || typeof manifest.files !== "object") {
    throw bad("it lacks shard_size, files, shards or tensors");
  }
  // Shards are files beside the manifest; a path elsewhere would fetch another file of the host.
  const shard = manifest.shards.find((s) => !/^[^/\\:]+$/.test(s?.path) || s.path === "." || s.path === ".." || !count(s.length) || typeof s.sha256 !== "string");
  if (shard) throw bad(`shard ${JSON.stringify(shard)} is not a file name beside the manifest with a length and SHA-256`);
  const tensor = manifest.tensors.find((t) => !(count(t?.shard) && t.shard < manifest.shards.length && count(t.offset) && count(t.length) && Array.isArray(t.shape)));
  if (tensor) throw bad(`tensor ${JSON.stringify(tensor?.name)} does not lie in one of its ${manifest.shards.length} shards`);
  return manifest;
}

/** The manifest of a stored package. */
async function storedManifest(base: string): Promise<PackageManifest> {
  return parseManifest(await (await openStored(base, MANIFEST)).all(), base);
}

/** A small file's bytes, not stored. */
async function fetchBytes(url: string, signal: AbortSignal): Promise<Uint8Array> {
  const res = await network(() => fetch(url, { cache: "no-store", signal }));
  if (!res.ok) throw new NetworkError(`${url}: HTTP ${res.status}`);
  return new Uint8Array(await network(() => res.arrayBuffer()));
}

async function remoteSize(url: string): Promise<number | null> {
  const res = await network(() => fetch(url, { method: "HEAD", cache: "no-store" }));
  if (res.status === 404) throw new NotFound(`${url} was not found (HTTP 404)`);
  if (!res.ok) throw new NetworkError(`${url}: HTTP ${res.status}`);
  const n = res.headers.get("content-length");
  return n === null ? null : Number(n);
}

/** The storage the planned files still take; converted weights keep a fraction of their (usually f16) source. */
function neededBytes(files: PlannedFile[]): number {
  const ratio: Record<string, number> = { f16: 1, q8: 0.55, q4: 0.3 };
  const kept = (f: PlannedFile) => (f.convert ? ratio[f.convert] : 1);
  return files.reduce((sum, f) => sum + (f.complete || f.absent ? 0 : ((f.size ?? 0) - f.received) * kept(f)), 0);
}

/** The storage the browser still allows this site; null where it does not say. */
export async function freeStorage(): Promise<number | null> {
  if (!navigator.storage?.estimate) return null;
  const { quota, usage = 0 } = await navigator.storage.estimate();
  return quota === undefined ? null : Math.max(0, quota - usage);
}

/** Why a download of `needed` bytes cannot start with `free` bytes left. */
function tooLarge(needed: number, free: number): string {
  return `The model needs ${bytes(needed)} more storage, but the browser allows this site only ${bytes(free)} more. Free disk space or remove other cached models, then try again.`;
}

/** Fails with a clear message when the browser will not give the site enough space. */
export async function checkSpace(files: PlannedFile[]): Promise<void> {
  const needed = neededBytes(files);
  const free = needed > 0 ? await freeStorage() : null;
  if (free !== null && needed > free) throw new StorageShort(tooLarge(needed, free));
}

/** What downloading a model still takes, before anything of it is fetched. */
export interface DownloadNeeds {
  /** Bytes the files will take in storage. */
  needed: number;
  free: number | null;
  /** The message Generate would refuse with; null when it fits. */
  refusal: string | null;
}

/**
 * Plans the model as the worker will, storing nothing (the host answers HEAD requests with the
 * sizes; a package's small manifest is read), and compares what it needs with the free storage.
 */
export async function downloadNeeds(base: string, precision: Precision): Promise<DownloadNeeds> {
  const plan = await planModel(base, precision, new AbortController().signal, true);
  const needed = neededBytes(plan.files);
  const free = await freeStorage();
  return { needed, free, refusal: free !== null && needed > free ? tooLarge(needed, free) : null };
}

export interface CacheStatus {
  bytes: number;
  /** A Kiln package (its precision is its own), rather than a diffusers repo. */
  package: boolean;
  /** The precisions the model is completely cached in (a package: its own format). */
  precisions: Precision[];
}

/** How much of a model is stored, and in which precisions all of it is verified. */
export async function modelStatus(base: string): Promise<CacheStatus> {
  const records = await recordsOf(base);
  const done = new Set(records.filter((r) => r.complete && !r.absent).map((r) => r.path));
  const bytes = records.reduce((sum, r) => sum + storedBytes(r), 0);
  if (done.has(MANIFEST)) {
    const manifest = await storedManifest(base);
    return { bytes, package: true, precisions: manifest.shards.every((s) => done.has(s.path)) ? [manifest.format] : [] };
  }
  const complete = new Set(records.filter((r) => r.complete).map((r) => r.path));
  const small = [...LAYOUT.required_files, ...LAYOUT.optional_files].every((p) => complete.has(p));
  const precisions = LAYOUT.precisions.filter((p) => {
    const key = (v: string) => (p === "original" ? v : `${v}#${p}`);
    return small && WEIGHT_STEMS.every((s) => weightVariants(s).some((v) => done.has(key(v))));
  });
  return { bytes, package: false, precisions };
}

/**
 * Deletes everything stored for a model; returns the bytes freed. Holds each file's download
 * lock meanwhile, so no tab appends to a file as it goes; refuses while one is downloading.
 */
export async function removeModel(base: string): Promise<number> {
  const records = await recordsOf(base);
  const holding = async (keys: string[]): Promise<void> => {
    if (keys.length === 0) {
      return write((files, chunks) => {
        for (const r of records) {
          files.delete(r.key);
          chunks.delete(chunkRange(r.key));
        }
      });
    }
    return navigator.locks.request(`kiln:${keys[0]}`, { ifAvailable: true }, async (lock) => {
      if (!lock) throw new Error("The model is downloading in another tab; remove it once that finishes.");
      return holding(keys.slice(1));
    });
  };
  await holding(records.map((r) => r.key));
  return records.reduce((sum, r) => sum + storedBytes(r), 0);
}

// ---- downloading ----

/** A stored, verified file. */
export async function openStored(base: string, path: string): Promise<StoredFile> {
  const rec = await getRecord(keyOf(base, path));
  if (!rec?.complete || rec.absent) throw new Error(`${base}/${path} is not in the cache`);
  return new StoredFile(rec);
}

/**
 * Stores `${base}/${path}` completely and verified, continuing whatever part is already
 * stored. `onProgress` gets the file's stored-or-buffered byte count as data arrives.
 */
export async function download(base: string, path: string, signal: AbortSignal, onProgress: (received: number) => void, sha256?: string): Promise<FileRecord> {
  return retrying(keyOf(base, path), signal, (rec) => fetchRest(base, path, rec, signal, onProgress, sha256));
}

/**
 * Runs `resume` from the stored record of `key` until the file is complete, again after each
 * dropped connection (up to ATTEMPTS, waiting longer each time). Holds the file's lock, as two
 * tabs must not append to the same file at once.
 */
function retrying(key: string, signal: AbortSignal, resume: (rec: FileRecord | null) => Promise<FileRecord>): Promise<FileRecord> {
  return navigator.locks.request(`kiln:${key}`, async () => {
    for (let attempt = 1; ; attempt++) {
      const rec = await getRecord(key);
      if (rec?.complete) return rec;
      try {
        return await resume(rec ?? null);
      } catch (e) {
        if (!(e instanceof NetworkError) || signal.aborted || attempt === ATTEMPTS) throw e;
        await new Promise((r) => setTimeout(r, 1000 * 2 ** attempt));
      }
    }
  });
}

/**
 * Stores the weight file `${base}/${path}` converted to `precision`, continuing after the
 * last converted tensor already stored. Only the converted bytes are kept; the source is
 * hashed as it streams by and checked like any download before the record is complete.
 */
export async function downloadConverted(
  base: string,
  path: string,
  precision: Precision,
  convert: Converter,
  signal: AbortSignal,
  onProgress: (received: number) => void,
): Promise<FileRecord> {
  return retrying(keyOf(base, path, precision), signal, (rec) => fetchConverted(base, path, precision, rec, convert, signal, onProgress));
}

async function fetchConverted(
  base: string,
  path: string,
  precision: Precision,
  rec: FileRecord | null,
  convert: Converter,
  signal: AbortSignal,
  onProgress: (n: number) => void,
): Promise<FileRecord> {
  const url = `${base}/${path}`;
  // Every tensor converted and stored, but not yet verified (the tab closed, or the connection
  // dropped after the last tensor): there is nothing left to ask the host for.
  const header = rec?.converted?.header;
  if (rec && header && rec.received === header.fileSize) return finishConverted(rec, Sha256.restore(rec.hash!), Math.max(rec.received, rec.size ?? 0));
  const { res, etag, range, resumes } = await requestRest(url, rec, signal);
  if (rec && !resumes) {
    await discard(rec.key);
    await res.body?.cancel();
    return fetchConverted(base, path, precision, null, convert, signal, onProgress);
  }
  const length = res.headers.get("content-length");
  rec ??= {
    key: keyOf(base, path, precision),
    base,
    path: storedPath({ path, convert: precision }),
    size: range ? Number(range[2]) : length === null ? null : Number(length),
    received: 0,
    chunkSize: 0,
    sha256: await statedSha256(res, base, path),
    etag,
    hash: new Sha256().save(),
    complete: false,
    converted: { header: null, tensors: [], chunks: 0 },
  };
  const state = rec.converted!;
  const hasher = Sha256.restore(rec.hash!);
  // Source bytes from `rec.received` on: hashed and dropped once their tensors are stored.
  let pending = new Uint8Array(0);
  let out: Uint8Array[] = [];
  let outBytes = 0;
  /** The source offset up to which every tensor is converted (stored or in `out`). */
  let converted = rec.received;
  const left = state.header?.tensors.findIndex((t) => t.end > converted) ?? 0;
  let next = left < 0 ? state.header!.tensors.length : left;
  /** Stores the tensors in `out` and the record, as of source offset `converted`. */
  const flush = async () => {
    const used = converted - rec!.received;
    hasher.update(pending.subarray(0, used));
    pending = pending.slice(used);
    const chunk = new Uint8Array(outBytes);
    out.reduce((at, part) => (chunk.set(part, at), at + part.length), 0);
    const index = state.chunks;
    const updated: FileRecord = { ...rec!, received: converted, hash: hasher.save(), converted: { ...state, chunks: index + (outBytes > 0 ? 1 : 0) } };
    await write((files, chunks) => {
      if (outBytes > 0) chunks.put(chunk, [rec!.key, index]);
      files.put(updated);
    });
    Object.assign(rec!, updated);
    Object.assign(state, updated.converted);
    out = [];
    outBytes = 0;
  };
  const reader = res.body!.getReader();
  for (;;) {
    const { done, value } = await network(() => reader.read());
    if (done) break;
    const grown = new Uint8Array(pending.length + value.length);
    grown.set(pending);
    grown.set(value, pending.length);
    pending = grown;
    if (!state.header && pending.length >= 8) {
      const n = headerLength(pending.subarray(0, 8));
      if (pending.length >= 8 + n) {
        state.header = parseHeader(pending.subarray(8, 8 + n));
        converted = 8 + n;
      }
    }
    const tensors = state.header?.tensors ?? [];
    while (next < tensors.length && tensors[next].end <= rec.received + pending.length) {
      const t = tensors[next++];
      const result = convert(t, pending.subarray(t.begin - rec.received, t.end - rec.received), precision);
      if (result) {
        state.tensors.push({ name: t.name, format: result.format, shape: t.shape, chunk: state.chunks, offset: outBytes, length: result.bytes.length });
        out.push(result.bytes);
        outBytes += result.bytes.length;
      }
      converted = t.end;
      if (outBytes >= CHUNK) await flush();
    }
    onProgress(rec.received + pending.length);
  }
  const arrived = rec.received + pending.length;
  const unconverted = !state.header || next < state.header.tensors.length;
  // Short of the stated size (or, with none stated, of the header's tensors): a dropped
  // connection. Keep what is converted; the next attempt asks for the rest.
  if (rec.size === null ? unconverted : arrived < rec.size) {
    await flush();
    throw new NetworkError(`The connection closed after ${arrived} bytes of ${path}.`);
  }
  await flush();
  return finishConverted(rec, hasher, arrived);
}

/** Verifies a converted file whose source has streamed by (`arrived` bytes of it), as `finish` does. */
function finishConverted(rec: FileRecord, hasher: Sha256, arrived: number): Promise<FileRecord> {
  const header = rec.converted!.header;
  const problem = !header
    ? "it ends inside its safetensors header"
    : arrived !== header.fileSize
      ? `its header describes ${header.fileSize} bytes but ${arrived} arrived`
      : rec.sha256 && hasher.hex() !== rec.sha256
        ? "its SHA-256 differs from the one the host states"
        : null;
  return settle(rec, problem);
}

/**
 * GETs `url` from where `rec` stopped. `resumes` is false when a stored part exists but the
 * reply does not continue it (the host ignored the range, or the file changed since).
 */
async function requestRest(url: string, rec: FileRecord | null, signal: AbortSignal) {
  const from = rec?.received ?? 0;
  const res = await network(() => fetch(url, { cache: "no-store", signal, headers: from > 0 ? { Range: `bytes=${from}-` } : {} }));
  if (res.status === 404) throw new NotFound(`${url} was not found (HTTP 404)`);
  if (res.status !== 200 && res.status !== 206) throw new NetworkError(`${url}: HTTP ${res.status}`);
  const etag = res.headers.get("x-linked-etag") ?? res.headers.get("etag");
  const range = /^bytes (\d+)-\d+\/(\d+)$/.exec(res.headers.get("content-range") ?? "");
  const resumes = !rec || from === 0 || (res.status === 206 && Number(range?.[1]) === from && rec.etag === etag);
  return { res, etag, range, resumes };
}

/** Runs a fetch step, turning a lost connection into a NetworkError. */
async function network<T>(step: () => Promise<T>): Promise<T> {
  try {
    return await step();
  } catch (e) {
    throw new NetworkError(`The connection failed (${(e as Error).message}).`);
  }
}

/** The SHA-256 the host states: the HF hub puts it in `x-linked-etag` (LFS files) or `etag`. */
async function statedSha256(res: Response, base: string, path: string): Promise<string | null> {
  for (const name of ["x-linked-etag", "etag"]) {
    const value = res.headers.get(name)?.replace(/^W\//, "").replaceAll('"', "");
    if (value && /^[0-9a-f]{64}$/i.test(value)) return value.toLowerCase();
  }
  return hubPointerSha256(base, path);
}

/**
 * On huggingface.co the `x-linked-etag` sits on the redirect to the CDN, which fetch follows
 * unseen; the same SHA-256 is in the file's LFS pointer at `…/raw/<revision>/<path>`.
 */
async function hubPointerSha256(base: string, path: string): Promise<string | null> {
  const hub = /^(https:\/\/huggingface\.co\/.+)\/resolve\/([^/]+)$/.exec(base);
  if (!hub || !path.endsWith(".safetensors")) return null;
  const res = await fetch(`${hub[1]}/raw/${hub[2]}/${path}`, { cache: "no-store" }).catch(() => null);
  return (res?.ok && /^oid sha256:([0-9a-f]{64})$/m.exec(await res.text())?.[1]) || null;
}

async function fetchRest(
  base: string,
  path: string,
  rec: FileRecord | null,
  signal: AbortSignal,
  onProgress: (n: number) => void,
  sha256?: string,
): Promise<FileRecord> {
  if (rec && rec.size !== null && rec.received === rec.size) return finish(rec, Sha256.restore(rec.hash!), 206);
  const url = `${base}/${path}`;
  const { res, etag, range, resumes } = await requestRest(url, rec, signal);
  if (rec && !resumes) {
    // The host ignored the range or the file changed since: the stored part is worthless.
    await discard(rec.key);
    rec = null;
    if (res.status === 206) {
      await res.body?.cancel();
      return fetchRest(base, path, null, signal, onProgress, sha256);
    }
  }
  const length = res.headers.get("content-length");
  rec ??= {
    key: keyOf(base, path),
    base,
    path,
    size: range ? Number(range[2]) : length === null ? null : Number(length),
    received: 0,
    chunkSize: CHUNK,
    sha256: sha256 ?? (await statedSha256(res, base, path)),
    etag,
    hash: new Sha256().save(),
    complete: false,
  };
  const hasher = Sha256.restore(rec.hash!);
  const reader = res.body!.getReader();
  const buffer = new Uint8Array(rec.chunkSize);
  let fill = 0;
  for (;;) {
    const { done, value } = await network(() => reader.read());
    if (done) break;
    for (let i = 0; i < value.length; ) {
      const n = Math.min(buffer.length - fill, value.length - i);
      buffer.set(value.subarray(i, i + n), fill);
      fill += n;
      i += n;
      if (fill === buffer.length) {
        await store(rec, hasher, buffer);
        fill = 0;
      }
    }
    onProgress(rec.received + fill);
  }
  // A body that ends short without an error is a dropped connection too: keep the whole
  // chunks, and let the next attempt fetch the rest.
  if (rec.size !== null && rec.received + fill < rec.size) {
    throw new NetworkError(`The connection closed after ${rec.received + fill} of ${rec.size} bytes of ${path}.`);
  }
  if (fill > 0) await store(rec, hasher, buffer.slice(0, fill));
  return finish(rec, hasher, res.status);
}

/** Appends one chunk and the record counting it, atomically. */
async function store(rec: FileRecord, hasher: Sha256, bytes: Uint8Array): Promise<void> {
  const index = rec.received / rec.chunkSize;
  hasher.update(bytes);
  const next = { ...rec, received: rec.received + bytes.length, hash: hasher.save() };
  await write((files, chunks) => {
    chunks.put(bytes, [rec.key, index]);
    files.put(next);
  });
  Object.assign(rec, next);
}

/** Verifies a fully stored file and marks it complete, or discards it. */
async function finish(rec: FileRecord, hasher: Sha256, status: number): Promise<FileRecord> {
  return settle(rec, await verify(rec, hasher, status));
}

/** Discards a file that has a `problem`; else marks it complete. */
async function settle(rec: FileRecord, problem: string | null): Promise<FileRecord> {
  if (problem) {
    await discard(rec.key);
    const source = rec.path.replace(/#[^#]*$/, "");
    throw new CorruptDownload(`${rec.base}/${source} is corrupt (${problem}). The download was discarded; try again.`);
  }
  const done = { ...rec, size: rec.received, hash: null, complete: true };
  await write((files) => files.put(done));
  return done;
}

/** What is wrong with a stored file, or null. */
async function verify(rec: FileRecord, hasher: Sha256, status: number): Promise<string | null> {
  // A compressed 200 response decodes to more bytes than its Content-Length states.
  if (rec.size !== null && rec.received > rec.size && status === 206) return `${rec.received} bytes where the host stated ${rec.size}`;
  if (rec.sha256 && hasher.hex() !== rec.sha256) return "its SHA-256 differs from the one the host or manifest states";
  const file = new StoredFile(rec);
  if (rec.path.endsWith(".safetensors")) {
    let header;
    try {
      header = await file.safetensorsHeader();
    } catch (e) {
      return (e as Error).message;
    }
    if (header.fileSize !== rec.received) return `its header describes ${header.fileSize} bytes but ${rec.received} arrived`;
  } else if (rec.path.endsWith(".json")) {
    try {
      JSON.parse(new TextDecoder().decode(await file.all()));
    } catch {
      return "it is not valid JSON";
    }
  }
  return null;
}
