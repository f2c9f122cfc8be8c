// The safetensors layout: an 8-byte little-endian header length N, N bytes of JSON
// ({name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}), then the data.

export interface TensorEntry {
  name: string;
  dtype: string;
  shape: number[];
  /** Absolute byte offsets in the file. */
  begin: number;
  end: number;
}

export interface Header {
  tensors: TensorEntry[];
  /** The file's length as the header implies it. */
  fileSize: number;
}

const DTYPE_BYTES: Record<string, number> = { F64: 8, F32: 4, F16: 2, BF16: 2, I64: 8, I32: 4, I16: 2, I8: 1, U8: 1, BOOL: 1 };

/** Headers are small JSON; anything larger means the file is not safetensors. */
const MAX_HEADER = 100 << 20;

/** The JSON header's length from the file's first 8 bytes. */
export function headerLength(first8: Uint8Array): number {
  const view = new DataView(first8.buffer, first8.byteOffset, 8);
  const n = view.getUint32(0, true) + view.getUint32(4, true) * 2 ** 32;
  if (n < 2 || n > MAX_HEADER) throw new Error(`not a safetensors file (header length ${n})`);
  return n;
}

/** Parses and checks the header: every tensor's bytes match its shape and lie inside the file. */
export function parseHeader(json: Uint8Array): Header {
  let raw: Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }>;
  try {
    raw = JSON.parse(new TextDecoder().decode(json));
  } catch {
    throw new Error("not a safetensors file (its header is not JSON)");
  }
  if (typeof raw !== "object" || raw === null || Array.isArray(raw)) throw new Error("not a safetensors file (its header is not a JSON object)");
  const count = (n: unknown) => Number.isSafeInteger(n) && (n as number) >= 0;
  const dataStart = 8 + json.length;
  const tensors: TensorEntry[] = [];
  let dataEnd = 0;
  for (const [name, t] of Object.entries(raw)) {
    if (name === "__metadata__") continue;
    const described = typeof t?.dtype === "string" && Array.isArray(t.shape) && t.shape.every(count) && Array.isArray(t.data_offsets) && t.data_offsets.length === 2 && t.data_offsets.every(count);
    if (!described) throw new Error(`not a safetensors file (tensor ${name} lacks a dtype, shape or data_offsets)`);
    const [begin, end] = t.data_offsets;
    const size = t.shape.reduce((a, b) => a * b, 1) * (DTYPE_BYTES[t.dtype] ?? NaN);
    if (!(end - begin === size && begin >= 0)) throw new Error(`tensor ${name}: ${end - begin} bytes for ${t.dtype} ${JSON.stringify(t.shape)}`);
    tensors.push({ name, dtype: t.dtype, shape: t.shape, begin: dataStart + begin, end: dataStart + end });
    dataEnd = Math.max(dataEnd, end);
  }
  tensors.sort((a, b) => a.begin - b.begin);
  return { tensors, fileSize: dataStart + dataEnd };
}
