"""An independent reference for Kiln's q8/q4 formats, written from docs/packages.md alone (not
from crate/src/quant.rs): the bytes of one test vector in each format, and the values those bytes
stand for. `crate/tests/quant_reference.rs` checks that Kiln encodes the vector to the same bytes
and decodes these bytes to the same values.

The vector is meant to reach every corner of the format: a block of zeros, a block whose one
outlier makes a clipping scale the better one, scales that are f16 subnormals, a block with a
negative maximum, and a length that ends in a partial block and (for q4) a lone low nibble.

    python3 scripts/quant_reference.py     (needs numpy; writes tests/fixtures/quant/)
"""
import os

import numpy as np

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "quant")
BLOCK = 32
Q_MAX = {"q8": 127, "q4": 7}
f32 = np.float32


def test_vector():
    rng = np.random.default_rng(20261204)
    blocks = [
        rng.standard_t(3, BLOCK),  # heavy tails, as trained weights have
        np.zeros(BLOCK),
        np.concatenate([rng.normal(0, 0.01, BLOCK - 1), [0.5]]),  # one outlier
        rng.normal(0, 1e-6, BLOCK),  # scales below f16's normal range
        -np.abs(rng.normal(0, 3, BLOCK)),  # the largest magnitude is negative
        rng.uniform(-1, 1, BLOCK),
        rng.normal(0, 0.2, 13),  # a partial block of odd length
    ]
    return np.concatenate(blocks).astype(f32)


def round_half_away(x):
    """Rounds float32 quotients to the nearest integer, halves away from zero (exact in float64)."""
    x = x.astype(np.float64)
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def quantize(block, scale, q_max):
    if scale == 0:
        return np.zeros(block.size)
    return np.clip(round_half_away(block / f32(scale)), -q_max, q_max)


def squared_error(block, scale, q_max):
    """Summed in float32, value by value, in order."""
    q = quantize(block, scale, q_max)
    total = f32(0)
    for v, k in zip(block, q):
        d = f32(v - f32(k) * f32(scale))
        total = f32(total + d * d)
    return total


def block_scale(block, q_max):
    """The f16 scale that just fits the block's largest magnitude, or, if its squared error is
    lower, one of the ten scales 2%, 4%, … 20% below it (the first of equal ones)."""
    largest = np.abs(block).max()
    fitting = np.float16(f32(largest) / f32(q_max))
    if f32(fitting) * f32(q_max) < largest:
        fitting = (np.array([fitting]).view(np.uint16) + 1).view(np.float16)[0]
    best, best_error = fitting, squared_error(block, f32(fitting), q_max)
    for k in range(1, 11):
        candidate = np.float16(f32(fitting) * (f32(1) - f32(0.02) * f32(k)))
        error = squared_error(block, f32(candidate), q_max)
        if error < best_error:
            best, best_error = candidate, error
    return best


def encode(values, fmt):
    q_max = Q_MAX[fmt]
    quants, scales = [], []
    for start in range(0, values.size, BLOCK):
        block = values[start : start + BLOCK]
        scale = block_scale(block, q_max)
        quants.append(quantize(block, f32(scale), q_max).astype(np.int8))
        scales.append(scale)
    q = np.concatenate(quants)
    if fmt == "q8":
        body = q.view(np.uint8)
    else:
        nibbles = (q.astype(np.int16) & 0xF).astype(np.uint8)
        if nibbles.size % 2:
            nibbles = np.append(nibbles, np.uint8(0))
        body = nibbles[0::2] | (nibbles[1::2] << 4)
    return np.concatenate([body, np.array(scales, dtype="<f2").view(np.uint8)])


def decode(data, n, fmt):
    blocks = -(-n // BLOCK)
    body, scales = data[: data.size - 2 * blocks], data[data.size - 2 * blocks :].view("<f2").astype(f32)
    if fmt == "q8":
        q = body.view(np.int8)[:n]
    else:
        low, high = body & 0xF, body >> 4
        q = np.stack([low, high], 1).reshape(-1)[:n].astype(np.int8)
        q = np.where(q > 7, q - 16, q)
    return (q.astype(f32) * np.repeat(scales, BLOCK)[:n]).astype(f32)


def main():
    os.makedirs(OUT, exist_ok=True)
    values = test_vector()
    np.save(os.path.join(OUT, "values.npy"), values)
    for fmt in Q_MAX:
        data = encode(values, fmt)
        np.save(os.path.join(OUT, f"{fmt}.npy"), data)
        np.save(os.path.join(OUT, f"{fmt}_decoded.npy"), decode(data, values.size, fmt))
        print(f"{fmt}: {data.size} bytes; max error {np.abs(decode(data, values.size, fmt) - values).max():.3g}")


if __name__ == "__main__":
    main()
