// Downloads into the cache (store.ts): streamed in as they arrive, resumed with HTTP Range
// after a reload or a lost connection, verified (length, SHA-256 when the host states one,
// safetensors layout, JSON) before they are marked complete. A repo's weights can be kept
// converted (f16, q8, q4): each tensor is converted as soon as its bytes have arrived and
// only the converted bytes are stored, under `${path}#${precision}`; the original file is
// never stored whole. The SHA-256 is the engine's (`sha2`), its state saved with each chunk;
// the worker instantiates the engine's module before it downloads anything.
import { Sha256, safetensors_header, safetensors_header_length } from "kiln-wasm";
import type { TensorEntry } from "./generated/TensorEntry";
import { CHUNK, StoredFile, discard, getRecord, keyOf, storedPath, write, type FileRecord } from "./store";
import { NetworkError, hostFetch, network, refusal, statedSha256 } from "./host";
import type { Precision } from "./model";

/** Attempts per file when the connection drops; each continues where the last stopped. */
const ATTEMPTS = 4;

/** Encodes one tensor for storage; null for tensors the engine does not read (integer buffers). */
export type Converter = (tensor: TensorEntry, bytes: Uint8Array, precision: Precision) => { format: string; bytes: Uint8Array } | null;

/** A file that arrived but failed verification. It has been discarded. */
export class CorruptDownload extends Error {}

/**
 * Stores `${base}/${path}` completely and verified, continuing whatever part is already
 * stored. `onProgress` gets the file's stored-or-buffered byte count as data arrives.
 */
export async function download(base: string, path: string, signal: AbortSignal, onProgress: (received: number) => void, sha256?: string): Promise<FileRecord> {
  const key = keyOf(base, path);
  const sink: Sink = { start: () => ({ key, path, chunkSize: CHUNK }), whole: (rec) => rec.size !== null && rec.received === rec.size, writer: chunkWriter };
  return retrying(key, signal, (rec) => fetchInto(base, path, rec, sink, signal, onProgress, sha256));
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
  const key = keyOf(base, path, precision);
  const sink: Sink = {
    start: () => ({ key, path: storedPath({ path, convert: precision }), chunkSize: 0, converted: { header: null, tensors: [], chunks: 0 } }),
    // Every tensor converted and stored, but not yet verified (the tab closed, or the
    // connection dropped after the last tensor): there is nothing left to ask the host for.
    whole: (rec) => !!rec.converted?.header && rec.received === rec.converted.header.fileSize,
    writer: (rec, hasher) => tensorWriter(rec, hasher, (t, bytes) => convert(t, bytes, precision)),
  };
  return retrying(key, signal, (rec) => fetchInto(base, path, rec, sink, signal, onProgress));
}

/**
 * Runs `resume` from the stored record of `key` until the file is complete, again after each
 * dropped connection (up to ATTEMPTS, waiting longer each time). Holds the file's lock, as two
 * tabs must not append to the same file at once. A part whose digest state an earlier Kiln
 * saved in another form is started over.
 */
function retrying(key: string, signal: AbortSignal, resume: (rec: FileRecord | null) => Promise<FileRecord>): Promise<FileRecord> {
  return navigator.locks.request(`kiln:${key}`, async () => {
    for (let attempt = 1; ; attempt++) {
      let rec = await getRecord(key);
      if (rec?.complete) return rec;
      if (rec && !(rec.hash instanceof Uint8Array)) {
        await discard(key);
        rec = undefined;
      }
      try {
        return await resume(rec ?? null);
      } catch (e) {
        if (!(e instanceof NetworkError) || signal.aborted || attempt === ATTEMPTS) throw e;
        await new Promise((r) => setTimeout(r, 1000 * 2 ** attempt));
      }
    }
  });
}

/** Where a download's bytes go: whole chunks of the file, or its tensors converted. */
interface Sink {
  /** The fields of a new record that are the sink's: its key, stored path and layout. */
  start(): Pick<FileRecord, "key" | "path" | "chunkSize" | "converted">;
  /** Whether `rec` holds every byte already, so that only the check is left. */
  whole(rec: FileRecord): boolean;
  /** Continues `rec`, whose source bytes so far `hasher` has digested. */
  writer(rec: FileRecord, hasher: Sha256): SinkWriter;
}

interface SinkWriter {
  /** Takes the source bytes that follow; stores what is complete. */
  take(bytes: Uint8Array): Promise<void>;
  /** The source bytes arrived so far, stored or held. */
  arrived(): number;
  /** Whether the source ended before the file did. */
  short(): boolean;
  /** Stores what a later attempt can continue from, after a short body. */
  keep(): Promise<void>;
  /** Stores the rest and verifies the file: marked complete, or discarded. */
  finish(status: number): Promise<FileRecord>;
}

/**
 * Streams `${base}/${path}` into `sink` from where `rec` stopped, asking the host for the
 * rest (HTTP Range). A stored part the reply does not continue is dropped.
 */
async function fetchInto(
  base: string,
  path: string,
  rec: FileRecord | null,
  sink: Sink,
  signal: AbortSignal,
  onProgress: (n: number) => void,
  sha256?: string,
): Promise<FileRecord> {
  if (rec && sink.whole(rec)) return sink.writer(rec, Sha256.restore(rec.hash!)).finish(206);
  const url = `${base}/${path}`;
  const { res, etag, range, resumes } = await requestRest(url, rec, signal);
  if (rec && !resumes) {
    // The host ignored the range or the file changed since: the stored part is worthless.
    await discard(rec.key);
    rec = null;
    if (res.status === 206) {
      await res.body?.cancel();
      return fetchInto(base, path, null, sink, signal, onProgress, sha256);
    }
  }
  const length = res.headers.get("content-length");
  rec ??= {
    ...sink.start(),
    base,
    size: range ? Number(range[2]) : length === null ? null : Number(length),
    received: 0,
    sha256: sha256 ?? (await statedSha256(res, base, path)),
    etag,
    hash: new Sha256().save(),
    complete: false,
  };
  const writer = sink.writer(rec, Sha256.restore(rec.hash!));
  const reader = res.body!.getReader();
  for (;;) {
    const { done, value } = await network(url, () => reader.read());
    if (done) break;
    await writer.take(value);
    onProgress(writer.arrived());
  }
  // A body that ends short without an error is a dropped connection too: keep what can be
  // continued, and let the next attempt ask for the rest.
  if (writer.short()) {
    await writer.keep();
    throw new NetworkError(`The connection closed after ${writer.arrived()}${rec.size === null ? "" : ` of ${rec.size}`} bytes of ${path}.`);
  }
  return writer.finish(res.status);
}

/** The file as it is, in chunks of `rec.chunkSize`; a partial chunk is stored only at the end. */
function chunkWriter(rec: FileRecord, hasher: Sha256): SinkWriter {
  const buffer = new Uint8Array(rec.chunkSize);
  let fill = 0;
  return {
    async take(value) {
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
    },
    arrived: () => rec.received + fill,
    short: () => rec.size !== null && rec.received + fill < rec.size,
    // Chunks are found by their index, so only whole ones are kept.
    keep: async () => {},
    async finish(status) {
      if (fill > 0) await store(rec, hasher, buffer.slice(0, fill));
      return settle(rec, await verify(rec, hasher, status));
    },
  };
}

/**
 * The file's tensors, each passed through `convert` as soon as its bytes are in, stored a
 * chunk of converted tensors at a time; the source bytes are hashed and dropped once their
 * tensors are stored.
 */
function tensorWriter(rec: FileRecord, hasher: Sha256, convert: (t: TensorEntry, bytes: Uint8Array) => { format: string; bytes: Uint8Array } | null): SinkWriter {
  const state = rec.converted!;
  // Source bytes from `rec.received` on.
  let pending = new Uint8Array(0);
  let out: Uint8Array[] = [];
  let outBytes = 0;
  /** The source offset up to which every tensor is converted (stored or in `out`). */
  let converted = rec.received;
  const left = state.header?.tensors.findIndex((t) => t.end > converted) ?? 0;
  let next = left < 0 ? state.header!.tensors.length : left;
  /** Stores the tensors in `out` and the record, as of source offset `converted`. */
  const flush = async () => {
    const used = converted - rec.received;
    hasher.update(pending.subarray(0, used));
    pending = pending.slice(used);
    const chunk = new Uint8Array(outBytes);
    out.reduce((at, part) => (chunk.set(part, at), at + part.length), 0);
    const index = state.chunks;
    const updated: FileRecord = { ...rec, received: converted, hash: hasher.save(), converted: { ...state, chunks: index + (outBytes > 0 ? 1 : 0) } };
    await write((files, chunks) => {
      if (outBytes > 0) chunks.put(chunk, [rec.key, index]);
      files.put(updated);
    });
    Object.assign(rec, updated);
    Object.assign(state, updated.converted);
    out = [];
    outBytes = 0;
  };
  const arrived = () => rec.received + pending.length;
  return {
    async take(value) {
      const grown = new Uint8Array(pending.length + value.length);
      grown.set(pending);
      grown.set(value, pending.length);
      pending = grown;
      if (!state.header && pending.length >= 8) {
        const n = safetensors_header_length(pending.subarray(0, 8));
        if (pending.length >= 8 + n) {
          state.header = safetensors_header(pending.subarray(8, 8 + n));
          converted = 8 + n;
        }
      }
      const tensors = state.header?.tensors ?? [];
      while (next < tensors.length && tensors[next].end <= arrived()) {
        const t = tensors[next++];
        const result = convert(t, pending.subarray(t.begin - rec.received, t.end - rec.received));
        if (result) {
          state.tensors.push({ name: t.name, format: result.format, shape: t.shape, chunk: state.chunks, offset: outBytes, length: result.bytes.length });
          out.push(result.bytes);
          outBytes += result.bytes.length;
        }
        converted = t.end;
        if (outBytes >= CHUNK) await flush();
      }
    },
    arrived,
    // With no size stated, the header's tensors tell whether all arrived.
    short: () => (rec.size === null ? !state.header || next < state.header.tensors.length : arrived() < rec.size),
    keep: flush,
    async finish() {
      // More than the header describes, stated or arrived, is a mismatch too.
      const total = Math.max(arrived(), rec.size ?? 0);
      await flush();
      const header = state.header;
      const problem = !header
        ? "it ends inside its safetensors header"
        : total !== header.fileSize
          ? `its header describes ${header.fileSize} bytes but ${total} arrived`
          : rec.sha256 && hasher.hex() !== rec.sha256
            ? SHA_MISMATCH
            : null;
      return settle(rec, problem);
    },
  };
}

const SHA_MISMATCH = "its SHA-256 differs from the one the host or manifest states";

/**
 * GETs `url` from where `rec` stopped. `resumes` is false when a stored part exists but the
 * reply does not continue it (the host ignored the range, or the file changed since).
 */
async function requestRest(url: string, rec: FileRecord | null, signal: AbortSignal) {
  const from = rec?.received ?? 0;
  const res = await hostFetch(url, { cache: "no-store", signal, headers: from > 0 ? { Range: `bytes=${from}-` } : {} });
  if (res.status !== 200 && res.status !== 206) throw refusal(url, res);
  const etag = res.headers.get("x-linked-etag") ?? res.headers.get("etag");
  const range = /^bytes (\d+)-\d+\/(\d+)$/.exec(res.headers.get("content-range") ?? "");
  const resumes = !rec || from === 0 || (res.status === 206 && Number(range?.[1]) === from && rec.etag === etag);
  return { res, etag, range, resumes };
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
  if (rec.sha256 && hasher.hex() !== rec.sha256) return SHA_MISMATCH;
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