// What a model needs from the cache: which files, which of them are stored, what the rest
// will take, and the model's removal. A model is a diffusers repo or a Kiln package
// (docs/packages.md: manifest.json and shards, each checked against the manifest's SHA-256).
import { package_manifest, pipeline_family } from "kiln-wasm";
import { CHUNK, StorageShort, StoredFile, chunkRange, keyOf, openStored, recordsOf, storedBytes, write, type FileRecord } from "./store";
import { CorruptDownload, download } from "./download";
import { NotFound, hostFetch, network, refusal } from "./host";
import { freeStorage, tooLarge } from "./quota";
import { LAYOUT, weightVariants, type Precision } from "./model";
import type { FamilyFiles } from "./generated/FamilyFiles";
import type { CacheStatus, DownloadNeeds } from "./protocol";
import type { PackageManifest } from "./generated/PackageManifest";

export type { PackageManifest };

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

/**
 * The files to load for a model, which of them still need downloading, and their sizes. A
 * repo's weights are planned in `precision`; a package (its manifest.json answers) comes as
 * it was packed. The manifest itself is fetched here, as the shards are only known from it;
 * so is a repo's model_index.json, and a pipeline the engine does not run is refused from it.
 * A `dry` plan stores nothing (not the manifest, nor which optional files the host lacks):
 * it tells what a download would take before one is asked for.
 */
export async function planModel(base: string, precision: Precision, signal: AbortSignal, dry = false): Promise<ModelPlan> {
  const repo = await planner(base, dry);
  /** A small file the plan reads: stored (unless the plan is dry and it is not stored yet), and as planned now. */
  const read = async (planned: PlannedFile): Promise<[Uint8Array, PlannedFile]> => {
    const { path } = planned;
    const raw = dry && !planned.complete ? await fetchBytes(`${base}/${path}`, signal) : await new StoredFile(await download(base, path, signal, () => {})).all();
    return [raw, { path, size: raw.length, received: raw.length, complete: true }];
  };
  const manifestFile = await repo.optional(MANIFEST);
  if (!manifestFile.absent) {
    const [raw, stored] = await read(manifestFile);
    const manifest = parseManifest(raw, base);
    const shards = manifest.shards.map(async (shard) => ({ ...(await repo.file(shard.path)), sha256: shard.sha256 }));
    return { manifest, precision: manifest.format, files: [stored, ...(await Promise.all(shards))] };
  }
  // A pipeline the engine does not run is refused from model_index.json, before any weight.
  const [index, indexFile] = await read(await repo.file(MODEL_INDEX));
  const family = checkPipeline(index, base);
  const convert = precision === "original" ? undefined : precision;
  const files = await Promise.all([
    ...LAYOUT.required_files.filter((p) => p !== MODEL_INDEX).map((p) => repo.file(p)),
    ...LAYOUT.optional_files.map((p) => repo.optional(p)),
    ...family.weight_stems.map((stem) => repo.weight(weightVariants(stem), convert)),
  ]);
  return { manifest: null, precision, files: [indexFile, ...files] };
}

/** A repo of a pipeline the engine does not run (SDXL, say). */
class UnsupportedPipeline extends Error {}

/** The family `modelIndex` names; fails with the engine's reason for a pipeline it does not run. */
function checkPipeline(modelIndex: Uint8Array, base: string): FamilyFiles {
  try {
    return pipeline_family(modelIndex, base);
  } catch (e) {
    throw new UnsupportedPipeline(e instanceof Error ? e.message : String(e));
  }
}

/** The files of the sharp preview's decoder (a TAESD repo), its weights as published. */
export async function planPreviewDecoder(base: string): Promise<PlannedFile[]> {
  const repo = await planner(base, false);
  const { config, weight_files } = LAYOUT.preview_decoder;
  return Promise.all([repo.file(config), repo.weight(weight_files)]);
}

/** Plans the files of the repo at `base` against what is stored of it (see `planModel` for `dry`). */
async function planner(base: string, dry: boolean) {
  const stored = new Map((await recordsOf(base)).map((r) => [r.key, r]));
  const file = async (path: string, convert?: Precision): Promise<PlannedFile> => {
    const rec = stored.get(keyOf(base, path, convert));
    if (rec?.complete) return { path, size: rec.size, received: rec.received, complete: true, absent: rec.absent, convert };
    return { path, size: await remoteSize(`${base}/${path}`), received: rec?.received ?? 0, complete: false, convert };
  };
  const optional = async (path: string): Promise<PlannedFile> => {
    try {
      return await file(path);
    } catch (e) {
      if (!(e instanceof NotFound)) throw e;
      const rec: FileRecord = { key: keyOf(base, path), base, path, size: 0, received: 0, chunkSize: CHUNK, sha256: null, etag: null, hash: null, complete: true, absent: true };
      if (!dry) await write((files) => files.put(rec));
      return { path, size: 0, received: 0, complete: true, absent: true };
    }
  };
  /** The first of a weight file's `variants` the host has. */
  const weight = async (variants: string[], convert?: Precision): Promise<PlannedFile> => {
    // A variant already (partly) stored wins, so a resume or an offline start needs no probe.
    const key = (v: string) => keyOf(base, v, convert);
    const cached = variants.find((v) => stored.get(key(v))?.complete) ?? variants.find((v) => stored.has(key(v)));
    if (cached) return file(cached, convert);
    for (const path of variants) {
      try {
        return await file(path, convert);
      } catch (e) {
        if (!(e instanceof NotFound)) throw e;
      }
    }
    throw new NotFound(`${base} has neither ${variants.join(" nor ")}`);
  };
  return { file, optional, weight };
}

const { manifest: MANIFEST, model_index: MODEL_INDEX } = LAYOUT;

/** The manifest, checked by the engine as `kiln` checks it before any of it is used. */
function parseManifest(bytes: Uint8Array, base: string): PackageManifest {
  try {
    return package_manifest(bytes, `${base}/${MANIFEST}`);
  } catch (e) {
    throw new CorruptDownload(e instanceof Error ? e.message : String(e));
  }
}

/** The manifest of a stored package. */
async function storedManifest(base: string): Promise<PackageManifest> {
  return parseManifest(await (await openStored(base, MANIFEST)).all(), base);
}

/** A small file's bytes, not stored. */
async function fetchBytes(url: string, signal: AbortSignal): Promise<Uint8Array> {
  const res = await hostFetch(url, { cache: "no-store", signal });
  if (!res.ok) throw refusal(url, res);
  return new Uint8Array(await network(url, () => res.arrayBuffer()));
}

async function remoteSize(url: string): Promise<number | null> {
  const res = await hostFetch(url, { method: "HEAD", cache: "no-store" });
  if (!res.ok) throw refusal(url, res);
  const n = res.headers.get("content-length");
  return n === null ? null : Number(n);
}

/** The storage the planned files still take; converted weights keep a fraction of their (usually f16) source. */
function neededBytes(files: PlannedFile[]): number {
  const ratio: Record<string, number> = { f16: 1, q8: 0.55, q4: 0.3 };
  const kept = (f: PlannedFile) => (f.convert ? ratio[f.convert] : 1);
  return files.reduce((sum, f) => sum + (f.complete || f.absent ? 0 : ((f.size ?? 0) - f.received) * kept(f)), 0);
}

/** Fails with a clear message when the browser will not give the site enough space. */
export async function checkSpace(files: PlannedFile[]): Promise<void> {
  const needed = neededBytes(files);
  const free = needed > 0 ? await freeStorage() : null;
  if (free !== null && needed > free) throw new StorageShort(tooLarge(needed, free));
}

/**
 * Plans the model as the worker will, storing nothing (the host answers HEAD requests with the
 * sizes; a package's small manifest is read), and compares what it needs with the free storage.
 */
export async function downloadNeeds(base: string, precision: Precision): Promise<DownloadNeeds> {
  let plan: ModelPlan;
  try {
    plan = await planModel(base, precision, new AbortController().signal, true);
  } catch (e) {
    if (e instanceof UnsupportedPipeline) return { needed: 0, free: null, refusal: e.message };
    throw e;
  }
  const needed = neededBytes(plan.files);
  const free = await freeStorage();
  return { needed, free, refusal: free !== null && needed > free ? tooLarge(needed, free) : null };
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
  // The weight files of the components the stored configs say the model has.
  const weights = LAYOUT.weight_files.filter((w) => done.has(w.config));
  const precisions = LAYOUT.precisions.filter((p) => {
    const key = (v: string) => (p === "original" ? v : `${v}#${p}`);
    return small && weights.every((w) => w.files.some((v) => done.has(key(v))));
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
