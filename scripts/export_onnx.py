#!/usr/bin/env python3
"""Exports a UNet to ONNX for the in-browser peer of `scripts/bench-web` (ONNX Runtime Web).

The graph takes what Kiln's UNet call takes: `sample` [B, C, H/8, W/8], `timestep` [1] and
`encoder_hidden_states` [B, 77, D], and returns the prediction as `out`. With --model the
weights are the folder's own (the same file Kiln loads); with --preset the published
architecture gets diffusers' random initialisation, for timing only.

Needs: torch, diffusers, onnx (pip).
"""
import argparse
import json
import pathlib

import torch
from diffusers import UNet2DConditionModel

PRESETS = pathlib.Path(__file__).resolve().parent.parent / "crate" / "presets"


class UNetCall(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=pathlib.Path, help="a diffusers pipeline folder")
    source.add_argument("--preset", choices=["sd15", "sd-turbo"], help="a published architecture, random weights")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    args = parser.parse_args()

    if args.model:
        unet = UNet2DConditionModel.from_pretrained(args.model / "unet")
    else:
        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config(json.loads((PRESETS / f"{args.preset}.json").read_text())["unet"])
    unet = unet.eval()
    latent = args.size // 8
    context_dim = unet.config.cross_attention_dim
    inputs = (
        torch.zeros(args.batch, unet.config.in_channels, latent, latent),
        torch.tensor([500.0]),
        torch.zeros(args.batch, 77, context_dim),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # Models over 2 GB keep their weights beside the graph (ONNX's protobuf limit).
    large = sum(p.numel() for p in unet.parameters()) * 4 > 2**31 - 2**24
    with torch.inference_mode():
        torch.onnx.export(
            UNetCall(unet),
            inputs,
            str(args.out),
            input_names=["sample", "timestep", "encoder_hidden_states"],
            output_names=["out"],
            opset_version=17,
            dynamo=False,
        )
    if large:
        import onnx

        model = onnx.load(str(args.out))
        onnx.save_model(model, str(args.out), save_as_external_data=True, all_tensors_to_one_file=True, location=args.out.name + ".data")
    print(json.dumps({"onnx": str(args.out), "params": sum(p.numel() for p in unet.parameters()), "external_data": large}))


if __name__ == "__main__":
    main()
