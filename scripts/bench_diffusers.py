#!/usr/bin/env python3
"""The PyTorch/diffusers peer of `kiln bench`: the same published architectures with random
weights, the same sizes, timed the same way (one warm-up, mean of --iters), printed as JSON.

Needs: torch, diffusers, transformers (pip).
"""
import argparse
import json
import pathlib
import time

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

PRESETS = pathlib.Path(__file__).resolve().parent.parent / "crate" / "presets"


def time_ms(fn, iters, device):
    """Mean wall time after one warm-up, synchronising the device like Kiln does."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        fn()
        sync()
        start = time.perf_counter()
        for _ in range(iters):
            fn()
            sync()
    return (time.perf_counter() - start) * 1000 / iters


def bench(name, size, batch, iters, device):
    preset = json.loads((PRESETS / f"{name}.json").read_text())
    text_cfg = {k: v for k, v in preset["text_encoder"].items() if not k.startswith("_") and k != "architectures"}
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg)).to(device).eval()
    unet = UNet2DConditionModel.from_config(preset["unet"]).to(device).eval()
    vae = AutoencoderKL.from_config(preset["vae"]).to(device).eval()
    params = lambda m: sum(p.numel() for p in m.parameters()) / 1e6

    latent = size // (2 ** (len(vae.config.block_out_channels) - 1))
    ids = torch.full((batch, text_encoder.config.max_position_embeddings), 49406, device=device)
    with torch.inference_mode():
        context = text_encoder(ids)[0]
    sample = torch.randn(batch, unet.config.in_channels, latent, latent, device=device)
    z = torch.randn(1, vae.config.latent_channels, latent, latent, device=device)
    t = torch.tensor([500.0], device=device)
    result = {
        "model": name,
        "params_millions": {"text_encoder": params(text_encoder), "unet": params(unet), "vae": params(vae)},
        "text_encoder_ms": time_ms(lambda: text_encoder(ids), iters, device),
        "unet_ms_per_call": time_ms(lambda: unet(sample, t, context), iters, device),
        "vae_decode_ms": time_ms(lambda: vae.decode(z), iters, device),
    }
    if device.type == "cuda":
        result["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="all", choices=["all", "sd15", "sd-turbo"])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    names = ["sd15", "sd-turbo"] if args.model == "all" else [args.model]
    report = {
        "engine": f"diffusers {__import__('diffusers').__version__} / torch {torch.__version__} (f32)",
        "device": str(device),
        "threads": torch.get_num_threads(),
        "size": args.size,
        "batch": args.batch,
        "iters": args.iters,
        "results": [bench(n, args.size, args.batch, args.iters, device) for n in names],
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
