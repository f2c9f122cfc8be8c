"""Signal-to-noise ratio per weight of Kiln's q4 and q8 (crate/src/quant.rs: symmetric blocks of
32, the scale with the least squared error among the fitting one and 10 smaller ones) on the
fixtures' quantized tensors, beside the rate-distortion bound for Gaussian weights at the same
bits per weight. The README's argument on q4's 30 dB target cites these figures.

    python3 scripts/quant_snr.py        (needs numpy)
"""
import json
import math
import os
import struct

import numpy as np

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
BLOCK = 32
KEPT = ("conv_in", "conv_out", "quant_conv", "post_quant_conv")


def tensors(path):
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    dtypes = {"F32": np.float32, "F16": np.float16}
    for name, t in header.items():
        if name != "__metadata__" and t["dtype"] in dtypes:
            begin, end = t["data_offsets"]
            yield name, np.frombuffer(data[8 + n + begin : 8 + n + end], dtype=dtypes[t["dtype"]]).astype(np.float64).reshape(t["shape"])


def quantized(name, x):
    """As `Format::for_tensor`: what a q4/q8 package quantizes (the rest stays f16)."""
    leaf = name.rsplit(".", 2)[-2] if "." in name else name
    return x.ndim >= 2 and not name.endswith("embedding.weight") and leaf not in KEPT and (x.size // x.shape[0]) % BLOCK == 0


def round_trip(x, q_max):
    blocks = x.reshape(-1, BLOCK)
    fitting = np.abs(blocks).max(1, keepdims=True) / q_max
    best_err, best = None, None
    for k in range(11):
        s = fitting * (1 - 0.02 * k)
        s = np.where(s == 0, 1, s)
        r = np.clip(np.round(blocks / s), -q_max, q_max) * s
        err = ((blocks - r) ** 2).sum(1, keepdims=True)
        better = err < best_err if best_err is not None else np.ones_like(err, dtype=bool)
        best_err = err if best_err is None else np.where(better, err, best_err)
        best = r if best is None else np.where(better, r, best)
    return best.ravel()


for model in ["sd1-tiny", "sd2-tiny"]:
    for stem in ["text_encoder/model", "unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model"]:
        path = os.path.join(FIXTURES, model, stem + ".safetensors")
        if not os.path.exists(path):
            path = path.replace(".safetensors", ".fp16.safetensors")
        chosen = [(n, x) for n, x in tensors(path) if quantized(n, x)]
        for label, q_max, bits in [("q4", 7, 4), ("q8", 127, 8)]:
            signal = sum((x**2).sum() for _, x in chosen)
            noise = sum(((x.ravel() - round_trip(x.ravel(), q_max)) ** 2).sum() for _, x in chosen)
            stored = bits + 16 / BLOCK
            print(f"{model} {stem.split('/')[0]:<12} {label}: {10 * math.log10(signal / noise):.1f} dB per weight "
                  f"(Gaussian bound at {stored} bits: {6.02 * stored:.1f} dB)")
