// Incremental SHA-256 (FIPS 180-4). WebCrypto only digests a whole buffer at once, and a
// weight file arrives in pieces over minutes (and across page loads), so the state must
// be fed piece by piece and saved beside the downloaded bytes.

const K = new Int32Array([
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
]);

const INITIAL = [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];

/** Everything needed to continue a digest later (structured-clonable, for IndexedDB). */
export interface Sha256State {
  h: number[];
  /** Bytes hashed so far. */
  length: number;
  /** The unprocessed tail (< 64 bytes). */
  tail: Uint8Array;
}

export class Sha256 {
  private h = new Int32Array(INITIAL);
  private w = new Int32Array(64);
  private block = new Uint8Array(64);
  private blockLen = 0;
  private length = 0;

  static restore(state: Sha256State): Sha256 {
    const s = new Sha256();
    s.h.set(state.h);
    s.length = state.length;
    s.block.set(state.tail);
    s.blockLen = state.tail.length;
    return s;
  }

  save(): Sha256State {
    return { h: Array.from(this.h), length: this.length, tail: this.block.slice(0, this.blockLen) };
  }

  update(data: Uint8Array): this {
    this.length += data.length;
    let i = 0;
    if (this.blockLen > 0) {
      const n = Math.min(64 - this.blockLen, data.length);
      this.block.set(data.subarray(0, n), this.blockLen);
      this.blockLen += n;
      i = n;
      if (this.blockLen < 64) return this;
      this.compress(this.block, 0);
      this.blockLen = 0;
    }
    for (; i + 64 <= data.length; i += 64) this.compress(data, i);
    this.block.set(data.subarray(i));
    this.blockLen = data.length - i;
    return this;
  }

  /** The digest as lowercase hex; the object must not be updated afterwards. */
  hex(): string {
    const bits = this.length * 8;
    const pad = new Uint8Array((this.blockLen < 56 ? 64 : 128) - this.blockLen);
    pad[0] = 0x80;
    const tail = new DataView(pad.buffer);
    tail.setUint32(pad.length - 8, Math.floor(bits / 2 ** 32));
    tail.setUint32(pad.length - 4, bits >>> 0);
    this.update(pad);
    return Array.from(this.h, (x) => (x >>> 0).toString(16).padStart(8, "0")).join("");
  }

  private compress(bytes: Uint8Array, offset: number): void {
    const w = this.w;
    for (let t = 0; t < 16; t++, offset += 4) {
      w[t] = (bytes[offset] << 24) | (bytes[offset + 1] << 16) | (bytes[offset + 2] << 8) | bytes[offset + 3];
    }
    for (let t = 16; t < 64; t++) {
      const a = w[t - 15], b = w[t - 2];
      const s0 = ((a >>> 7) | (a << 25)) ^ ((a >>> 18) | (a << 14)) ^ (a >>> 3);
      const s1 = ((b >>> 17) | (b << 15)) ^ ((b >>> 19) | (b << 13)) ^ (b >>> 10);
      w[t] = (w[t - 16] + s0 + w[t - 7] + s1) | 0;
    }
    const h = this.h;
    let a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], k = h[7];
    for (let t = 0; t < 64; t++) {
      const S1 = ((e >>> 6) | (e << 26)) ^ ((e >>> 11) | (e << 21)) ^ ((e >>> 25) | (e << 7));
      const t1 = (k + S1 + ((e & f) ^ (~e & g)) + K[t] + w[t]) | 0;
      const S0 = ((a >>> 2) | (a << 30)) ^ ((a >>> 13) | (a << 19)) ^ ((a >>> 22) | (a << 10));
      const t2 = (S0 + ((a & b) ^ (a & c) ^ (b & c))) | 0;
      k = g; g = f; f = e; e = (d + t1) | 0;
      d = c; c = b; b = a; a = (t1 + t2) | 0;
    }
    h[0] = (h[0] + a) | 0; h[1] = (h[1] + b) | 0; h[2] = (h[2] + c) | 0; h[3] = (h[3] + d) | 0;
    h[4] = (h[4] + e) | 0; h[5] = (h[5] + f) | 0; h[6] = (h[6] + g) | 0; h[7] = (h[7] + k) | 0;
  }
}
