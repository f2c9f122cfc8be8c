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
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

PRESETS = pathlib.Path(__file__).resolve().parent.parent / "crate" / "presets"
NAMES = sorted(p.stem for p in PRESETS.glob("*.json"))


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
    text_cfgs = [{k: v for k, v in preset[key].items() if not k.startswith("_") and k != "architectures"}
                 for key in ("text_encoder", "text_encoder_2") if key in preset]
    # SDXL's second encoder has the projection its pooled output goes through.
    classes = [CLIPTextModel, CLIPTextModelWithProjection][:len(text_cfgs)]
    text_encoders = [cls(CLIPTextConfig(**cfg)).to(device).eval() for cls, cfg in zip(classes, text_cfgs)]
    unet = UNet2DConditionModel.from_config(preset["unet"]).to(device).eval()
    vae = AutoencoderKL.from_config(preset["vae"]).to(device).eval()
    params = lambda m: sum(p.numel() for p in m.parameters()) / 1e6

    latent = size // (2 ** (len(vae.config.block_out_channels) - 1))
    ids = torch.full((batch, text_encoders[0].config.max_position_embeddings), 49406, device=device)
    with torch.inference_mode():
        context = torch.cat([te(ids).last_hidden_state for te in text_encoders], dim=-1)
    added = None
    if unet.config.addition_embed_type == "text_time":
        pooled = torch.randn(batch, text_encoders[-1].config.projection_dim, device=device)
        time_ids = torch.tensor([[size, size, 0, 0, size, size]] * batch, dtype=torch.float32, device=device)
        added = {"text_embeds": pooled, "time_ids": time_ids}
    sample = torch.randn(batch, unet.config.in_channels, latent, latent, device=device)
    z = torch.randn(1, vae.config.latent_channels, latent, latent, device=device)
    t = torch.tensor([500.0], device=device)
    result = {
        "model": name,
        "params_millions": {"text_encoder": sum(params(te) for te in text_encoders), "unet": params(unet), "vae": params(vae)},
        "text_encoder_ms": time_ms(lambda: [te(ids) for te in text_encoders], iters, device),
        "unet_ms_per_call": time_ms(lambda: unet(sample, t, context, added_cond_kwargs=added), iters, device),
        "vae_decode_ms": time_ms(lambda: vae.decode(z), iters, device),
    }
    if device.type == "cuda":
        result["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="all", choices=["all", *NAMES])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    names = NAMES if args.model == "all" else [args.model]
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
