#!/usr/bin/env python3
# Requires (pip): torch diffusers transformers>=5 open-clip-torch safetensors numpy pillow peft
"""Generate Kiln's numerical test fixtures from Hugging Face diffusers.

Run from the repository root:

    python3 scripts/make_fixtures.py                 # regenerate everything under tests/fixtures
    python3 scripts/make_fixtures.py --only prompts  # only tests/fixtures/prompts, from the pipelines there
    python3 scripts/make_fixtures.py --only lora     # only tests/fixtures/lora, from the pipelines there
    python3 scripts/make_fixtures.py --only lora-sdxl  # only lora/'s sdxl-* files and cases.json entries
    python3 scripts/make_fixtures.py --only sdxl     # only the SDXL fixtures, from the pipelines there
    python3 scripts/make_fixtures.py --only latent-upscale  # only the latent x2 upscaler's fixtures

Everything is random-weight, tiny and deterministic (fixed seeds); no real model weights are
used or downloaded.  Outputs (all under tests/fixtures/):

  sd1-tiny/, sd2-tiny/       tiny pipelines in the published diffusers folder layout
  images/                    reference txt2img PNGs + their latents/noise + cases.json
  tokenizer_cases.json       CLIP token ids for ~330 prompts (SD1 and SD2 padding)
  schedulers/                scheduler trajectories on fixed inputs, one JSON per case; add_noise.*:
                             img2img/inpainting starts (set_begin_index + add_noise) on the same inputs
  sd1-inpaint-tiny/          a 9-channel inpainting UNet; text encoder, tokenizer and VAE are
                             symlinks into sd1-tiny
  sd-x4-upscaler-tiny/       a tiny x4 upscaler (class-conditioned 7-channel UNet, own factor-4
                             VAE, low_res_scheduler); text encoder and tokenizer link into sd1-tiny
  editing/                   img2img / inpainting / upscaling references made by the diffusers
                             pipelines, their input images and every noise draw, + cases.json
  prompts/                   Automatic1111 prompt syntax: chunk ids and weights for both tokenizers,
                             and images made with its chunked, weighted text states (cases.json)
  taesd-tiny/                a tiny AutoencoderTiny (TAESD, the live preview's decoder) in the
                             published layout, + reference/: latents and diffusers' decode of them
  lora/                      random LoRAs for the tiny pipelines (kohya and diffusers/PEFT files) and
                             images made with them fused by diffusers (cases.json); the sdxl-* ones
                             for sdxl-tiny (kohya's SDXL file names its UNet layers as Stability's
                             original UNet does: input_blocks / middle_block / output_blocks)
  sdxl-tiny/                 a tiny SDXL pipeline (published layout): a new SDXL-style UNet (added
                             text_time conditioning); text_encoder/tokenizer/vae link into sd1-tiny,
                             text_encoder_2/tokenizer_2 into sd2-tiny (whose text encoder file also
                             carries a text_projection, so it loads as CLIPTextModelWithProjection)
  sdxl-turbo-tiny/           SDXL-Turbo's layout: its scheduler and model_index.json, all else links
                             into sdxl-tiny
  sd-x2-latent-upscaler-tiny/  a tiny StableDiffusionLatentUpscalePipeline: a K-diffusion UNet (2 blocks,
                             1 layer each, to fit the fixture budget) and the published scheduler config;
                             text encoder, tokenizer and VAE link into sd1-tiny
  latent-upscale/            its references on editing/'s init image (editing.json, the format of
                             editing/cases.json), and unet/: the published UNet's block structure (4
                             blocks, 2 layers, per-block head widths) with weights from a formula that
                             Kiln's test computes too (no weight file), and diffusers' output for it
  sdxl/                      SDXL txt2img references (images.json, the format of images/cases.json)
                             and img2img/inpainting references (editing.json, the format of
                             editing/cases.json; inputs are editing/'s), with latents and noise

Pip packages needed (no GPU, no network beyond PyPI):
  torch diffusers transformers>=5 open-clip-torch safetensors numpy pillow peft
(open-clip-torch is only used for its bundled bpe_simple_vocab_16e6.txt.gz.)

Tokenizer semantics: the fixtures pin transformers >= 5 behaviour.  The reference tokenizer is
transformers' current `CLIPTokenizer` (the `tokenizers`-backed class that diffusers runs): NFC,
whitespace runs -> " ", lowercase; CLIP's split regex; byte-level BPE; bos/eos/pad/unk as
special added tokens.  It is NOT the old pure-Python (slow) CLIPTokenizer of transformers 4.x,
whose text clean-up differs; the script refuses to run on transformers < 5.
"""

import argparse
import contextlib
import gzip
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import warnings

# Checked before anything imports transformers (see "Tokenizer semantics" above).
_TRANSFORMERS_VERSION = importlib.metadata.version("transformers")
if int(_TRANSFORMERS_VERSION.split(".")[0]) < 5:
    sys.exit(f"make_fixtures.py needs transformers >= 5 (found {_TRANSFORMERS_VERSION}): the fixtures pin "
             "the tokenizers-backed CLIPTokenizer of transformers 5, not the old slow tokenizer")

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # quiet save/load of the tiny models

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    AutoencoderTiny,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    DDPMScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionLatentUpscalePipeline,
    StableDiffusionPipeline,
    StableDiffusionUpscalePipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO_ROOT, "tests", "fixtures")
IMAGES_DIR = os.path.join(FIXTURES, "images")
SCHED_DIR = os.path.join(FIXTURES, "schedulers")

torch.set_grad_enabled(False)
warnings.filterwarnings("ignore")
diffusers.utils.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


def f32(x):
    """A float32 value as the shortest Python float that round-trips to the same float32.

    Keeps the JSON fixtures small while staying exact: parse as f32 to get the bit-identical value.
    """
    return float(str(np.float32(x)))


def write_json(path, obj, compact=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        if compact:
            json.dump(obj, f, ensure_ascii=False, separators=(",", ":"))
        else:
            json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")


# ----------------------------------------------------------------------------------------------
# 1. CLIP vocabulary
# ----------------------------------------------------------------------------------------------

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode():
    """CLIP/GPT-2 reversible byte -> printable unicode char table (same order as CLIP's)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def build_clip_vocab():
    """Rebuild CLIP's encoder/merges from open_clip's bundled BPE file, as SimpleTokenizer does.

    Located via find_spec so open_clip itself (which imports ftfy) is never imported.
    """
    pkg_dir = os.path.dirname(importlib.util.find_spec("open_clip").origin)
    lines = gzip.open(os.path.join(pkg_dir, "bpe_simple_vocab_16e6.txt.gz")).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += [BOS, EOS]
    assert len(vocab) == 49408 and len(set(vocab)) == 49408
    return {tok: i for i, tok in enumerate(vocab)}, merges


def _added_token(content):
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
            "rstrip": False, "single_word": False}


def write_tokenizer_dir(tok_dir, encoder, merges, pad_token):
    """Write vocab.json, merges.txt and the published-style tokenizer_config/special_tokens_map.

    transformers>=5 only saves tokenizer.json, so the files of the published SD repos are written
    by hand (SD 1.5 layout; SD 2.x pads with "!" = id 0).
    """
    if os.path.isdir(tok_dir):
        shutil.rmtree(tok_dir)
    os.makedirs(tok_dir)
    with open(os.path.join(tok_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(encoder, f, ensure_ascii=False, separators=(",", ":"))
    with open(os.path.join(tok_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    write_json(os.path.join(tok_dir, "tokenizer_config.json"), {
        "add_prefix_space": False,
        "bos_token": _added_token(BOS),
        "do_lower_case": True,
        "eos_token": _added_token(EOS),
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": _added_token(EOS),
    })
    special = {k: {kk: vv for kk, vv in _added_token(v).items() if kk != "__type"}
               for k, v in (("bos_token", BOS), ("eos_token", EOS), ("unk_token", EOS))}
    special["pad_token"] = pad_token
    write_json(os.path.join(tok_dir, "special_tokens_map.json"), dict(sorted(special.items())))


# ----------------------------------------------------------------------------------------------
# Reference tokenizer: transformers' current (>= 5, tokenizers-backed) CLIPTokenizer.
# ----------------------------------------------------------------------------------------------

def load_reference_tokenizer(tok_dir):
    """The tokenizer Kiln must match: CLIPTokenizer as installed, loaded as diffusers loads it."""
    tok = CLIPTokenizer.from_pretrained(tok_dir)
    assert tok.model_max_length == 77, tok.model_max_length
    return tok


def check_vocab(tok_dir):
    """Spec check from the brief: the rebuilt vocabulary gives CLIP's well-known ids."""
    got = load_reference_tokenizer(tok_dir)("a photo of a cat").input_ids
    assert got == [49406, 320, 1125, 539, 320, 2368, 49407], got


# ----------------------------------------------------------------------------------------------
# 2. Tiny random-weight pipelines
# ----------------------------------------------------------------------------------------------

# Published scheduler_config.json contents (SD 1.5 / SD 2.1-768 / SD-Turbo), minus version tags.
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}
SD21V_SCHEDULER = dict(SD15_SCHEDULER, _class_name="DDIMScheduler", prediction_type="v_prediction")
TURBO_SCHEDULER = dict(SD15_SCHEDULER, _class_name="EulerDiscreteScheduler", timestep_spacing="trailing",
                       interpolation_type="linear", use_karras_sigmas=False)

TEXT_ENCODER_SIZES = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, projection_dim=32)
UNET_COMMON = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2, cross_attention_dim=32, norm_num_groups=8, flip_sin_to_cos=True, freq_shift=0,
)
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, block_out_channels=(16, 32, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=64, scaling_factor=0.18215,
)

# SIZE NOTE: with sd2 using sd1's UNet (channels (32, 64, 64), 2 layers per block) the fixtures
# total ~28.4 MB, over the 25 MB budget: the 49408x32 CLIP token embedding (6.3 MB fp32) and sd1's
# 2.2M-parameter UNet (8.7 MB fp32) dominate.  sd1 is kept exactly at the requested SD1-like
# config; sd2 keeps every SD2-specific feature (linear projection, per-block head counts,
# upcast_attention, fp16-only files, v-prediction, "!" padding, gelu) but uses a (16, 32, 32)
# UNet with 1 layer per block (~0.38M parameters), which also exercises config-driven widths,
# depths and non-square cross-attention projections (16 channels vs 32-d text).
MODELS = {
    "sd1-tiny": dict(
        seed=100, hidden_act="quick_gelu", pad_token=EOS, pad_id=49407, layout="published",
        unet=dict(UNET_COMMON, attention_head_dim=4, use_linear_projection=False),
        vae=VAE_CONFIG, scheduler=SD15_SCHEDULER, scheduler_cls=PNDMScheduler, variant=None,
    ),
    "sd2-tiny": dict(
        seed=200, hidden_act="gelu", pad_token="!", pad_id=0, layout="transformers5",
        # Narrower/shallower than sd1 purely to keep tests/fixtures under 25 MB (SIZE NOTE above).
        unet=dict(UNET_COMMON, block_out_channels=(16, 32, 32), layers_per_block=1,
                  attention_head_dim=[2, 4, 4], use_linear_projection=True, upcast_attention=True),
        vae=VAE_CONFIG, scheduler=SD21V_SCHEDULER, scheduler_cls=DDIMScheduler, variant="fp16",
    ),
}

# Weight scaling (see texture_init): fan-in-normalised normal weights, jittered norms, and
# stronger cross-attention so that the prompt visibly matters.
WEIGHT_GAIN = 1.0          # conv/linear weight std = gain / sqrt(fan_in)
BIAS_STD = 0.05
NORM_JITTER = 0.1          # GroupNorm/LayerNorm weight = 1 + N(0, jitter), bias = N(0, jitter)
EMBED_STD = 1.0            # CLIP token and position embeddings
CROSS_ATTN_OUT_GAIN = 2.0  # attn2.to_out in the UNet: text conditioning strength
UNET_OUT_STD = 1.0         # target std of the noise prediction (calibrated via conv_out)
VAE_OUT_STD = 0.5          # target per-pixel std of decoded images in [-1, 1] (via decoder.conv_out)


def texture_init(model, seed, special_gains=None):
    """Re-initialise every conv/linear/norm/embedding deterministically.

    Default inits of diffusers/transformers give near-constant outputs for such tiny nets (grey
    images, prompt-independent); fan-in scaled unit-gain weights keep activations O(1) through
    the residual stacks.
    """
    gen = torch.Generator().manual_seed(seed)
    special_gains = special_gains or {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            gain = next((g for k, g in special_gains.items() if k in name), WEIGHT_GAIN)
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * gain / math.sqrt(fan_in))
            if m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * BIAS_STD)
        elif isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
            m.weight.copy_(1 + torch.randn(m.weight.shape, generator=gen) * NORM_JITTER)
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * NORM_JITTER)
        elif isinstance(m, nn.Embedding):
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * EMBED_STD)


def encode(text_encoder, tokenizer, prompt):
    ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def calibrate_unet(unet, text_encoder, tokenizer, seed, **unet_kwargs):
    """Scale conv_out so the prediction has std UNET_OUT_STD on N(0,1) inputs at t=500.

    The text states are "a photo of a cat" by text_encoder, unless unet_kwargs has
    encoder_hidden_states (SDXL: both encoders', with added_cond_kwargs)."""
    shape = (1, unet.config.in_channels, 8, 8)
    x = torch.from_numpy(np.random.RandomState(seed).standard_normal(shape).astype(np.float32))
    if "encoder_hidden_states" not in unet_kwargs:
        unet_kwargs["encoder_hidden_states"] = encode(text_encoder, tokenizer, "a photo of a cat")
    s = unet(x, 500, **unet_kwargs).sample.std().item()
    unet.conv_out.weight.mul_(UNET_OUT_STD / s)
    unet.conv_out.bias.mul_(UNET_OUT_STD / s)


def calibrate_vae(vae, seed):
    """Scale decoder.conv_out (zero bias) so decode(z / scaling_factor), z ~ N(0,1), has std VAE_OUT_STD."""
    z = torch.from_numpy(np.random.RandomState(seed).standard_normal((1, 4, 8, 8)).astype(np.float32))
    vae.decoder.conv_out.bias.zero_()
    s = vae.decode(z / vae.config.scaling_factor).sample.std().item()
    vae.decoder.conv_out.weight.mul_(VAE_OUT_STD / s)


def model_stats(pipe, label):
    """Print the statistics the brief asks for: UNet output scale and text dependence, VAE range."""
    tok, te, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
    x = torch.from_numpy(np.random.RandomState(7).standard_normal((1, 4, 8, 8)).astype(np.float32))
    e_cat, e_dog, e_unc = (encode(te, tok, p) for p in ("a photo of a cat", "a watercolor of a dog", ""))
    for t in (1, 500, 981):
        o_cat = unet(x, t, encoder_hidden_states=e_cat).sample
        o_dog = unet(x, t, encoder_hidden_states=e_dog).sample
        o_unc = unet(x, t, encoder_hidden_states=e_unc).sample
        print(f"  [{label}] unet t={t:4d}: out std {o_cat.std():.3f}  |cond-uncond| std {(o_cat - o_unc).std():.3f}"
              f"  |cat-dog| std {(o_cat - o_dog).std():.3f}")
    z = torch.from_numpy(np.random.RandomState(8).standard_normal((1, 4, 8, 8)).astype(np.float32))
    img = vae.decode(z / vae.config.scaling_factor).sample
    print(f"  [{label}] vae decode(N(0,1)/sf): mean {img.mean():.3f} std {img.std():.3f}"
          f"  saturated(|x|>1) {(img.abs() > 1).float().mean():.3f}")


def build_pipeline(name, spec, encoder, merges, tmp_tok_dir):
    """Build one tiny pipeline in memory, with textured random weights."""
    seed = spec["seed"]
    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_tok_dir)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_act=spec["hidden_act"], **TEXT_ENCODER_SIZES))
    unet = UNet2DConditionModel(**spec["unet"])
    vae = AutoencoderKL(**spec["vae"])
    texture_init(text_encoder, seed + 1)
    texture_init(unet, seed + 2, {"attn2.to_out": CROSS_ATTN_OUT_GAIN})
    texture_init(vae, seed + 3)
    calibrate_unet(unet, text_encoder, tokenizer, seed + 4)
    calibrate_vae(vae, seed + 5)
    sched_cfg = {k: v for k, v in spec["scheduler"].items() if not k.startswith("_")}
    scheduler = spec["scheduler_cls"].from_config(sched_cfg)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return pipe


def save_pipeline(pipe, out_dir, spec, encoder, merges):
    """save_pretrained in the published layout, then fix up tokenizer/ and scheduler/ by hand."""
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    if spec["variant"] == "fp16":
        pipe.to(torch.float16)
        for m in (pipe.unet, pipe.vae, pipe.text_encoder):
            assert all(torch.isfinite(p).all() for p in m.parameters()), "non-finite fp16 weights"
        pipe.save_pretrained(out_dir, safe_serialization=True, variant="fp16")
    else:
        pipe.save_pretrained(out_dir, safe_serialization=True)
    tok_dir = os.path.join(out_dir, "tokenizer")
    write_tokenizer_dir(tok_dir, encoder, merges, spec["pad_token"])
    if spec["layout"] == "published":
        prefix_text_encoder_names(out_dir)
    else:
        resave_tokenizer(tok_dir)
    write_json(os.path.join(out_dir, "scheduler", "scheduler_config.json"), spec["scheduler"])
    # model_index.json: keep what diffusers writes (null safety_checker/feature_extractor entries).
    with open(os.path.join(out_dir, "model_index.json")) as f:
        index = json.load(f)
    for comp in ("safety_checker", "feature_extractor", "image_encoder"):
        assert index.get(comp) in (None, [None, None]), (comp, index.get(comp))
    assert index.get("requires_safety_checker") is False


def prefix_text_encoder_names(out_dir):
    """Published SD repos name CLIP's tensors `text_model.*`; transformers 5 saves them bare.
    Both load the same model, so Kiln must read both: sd1 keeps the published names."""
    from safetensors.torch import load_file, save_file
    path = os.path.join(out_dir, "text_encoder", "model.safetensors")
    tensors = load_file(path)
    save_file({f"text_model.{k}": v for k, v in tensors.items()}, path, metadata={"format": "pt"})


def resave_tokenizer(tok_dir):
    """sd2 keeps the tokenizer as transformers 5 saves it: tokenizer.json + tokenizer_config.json,
    tokenizer.json minified (the same JSON; pretty-printed it is twice the size)."""
    tok = CLIPTokenizer.from_pretrained(tok_dir)
    shutil.rmtree(tok_dir)
    tok.save_pretrained(tok_dir)
    minify_json(os.path.join(tok_dir, "tokenizer.json"))


def minify_json(path):
    """Rewrite a JSON file without whitespace (same values, same key order); idempotent."""
    with open(path, encoding="utf-8") as f:
        obj = json.load(f)
    write_json(path, obj, compact=True)


def expected_files(spec):
    v = ".fp16" if spec["variant"] == "fp16" else ""
    tokenizer = (["tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/vocab.json"]
                 if spec["layout"] == "published" else ["tokenizer/tokenizer.json"])
    return sorted(tokenizer + [
        "model_index.json", "scheduler/scheduler_config.json",
        "text_encoder/config.json", f"text_encoder/model{v}.safetensors",
        "tokenizer/tokenizer_config.json",
        "unet/config.json", f"unet/diffusion_pytorch_model{v}.safetensors",
        "vae/config.json", f"vae/diffusion_pytorch_model{v}.safetensors",
    ])


def load_pipeline(out_dir, spec):
    """Reload FROM DISK in float32 (for sd2: the fp16 files, i.e. fp16-rounded weights)."""
    got = sorted(os.path.relpath(os.path.join(d, f), out_dir) for d, _, fs in os.walk(out_dir) for f in fs)
    assert got == expected_files(spec), got
    kwargs = {"variant": spec["variant"]} if spec["variant"] else {}
    pipe = StableDiffusionPipeline.from_pretrained(out_dir, torch_dtype=torch.float32, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert pipe.tokenizer.pad_token_id == spec["pad_id"], pipe.tokenizer.pad_token_id
    assert pipe.tokenizer.model_max_length == 77
    assert type(pipe.scheduler) is spec["scheduler_cls"]
    return pipe


# ----------------------------------------------------------------------------------------------
# Scheduler selection and noise capture (shared by images and scheduler arrays)
# ----------------------------------------------------------------------------------------------

SCHEDULERS = {  # Kiln name -> (diffusers class, extra from_config kwargs)
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp-2m": (DPMSolverMultistepScheduler,
                 dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=False)),
    "dpmpp-2m-karras": (DPMSolverMultistepScheduler,
                        dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True)),
    "lcm": (LCMScheduler, {}),
}

# Modules whose step() draws fresh noise through their own `randn_tensor` import.
NOISY_SCHEDULER_MODULES = (
    "diffusers.schedulers.scheduling_euler_ancestral_discrete",
    "diffusers.schedulers.scheduling_lcm",
)


def convert_scheduler(source, kiln_name):
    """What a diffusers user does: Target.from_config(pipe.scheduler.config, **extra)."""
    cls, extra = SCHEDULERS[kiln_name]
    return cls.from_config(source.config, **extra)


class NoiseTap:
    """Stands in for diffusers' randn_tensor inside the stochastic schedulers; records each draw."""

    def __init__(self, draw):
        self.draw = draw  # shape tuple -> float32 ndarray
        self.draws = []

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        arr = np.ascontiguousarray(self.draw(tuple(shape)), dtype=np.float32)
        self.draws.append(arr)
        return torch.from_numpy(arr.copy()).to(device=device or "cpu", dtype=dtype or torch.float32)


@contextlib.contextmanager
def tapped_noise(tap):
    mods = [sys.modules[name] for name in NOISY_SCHEDULER_MODULES]
    saved = [m.randn_tensor for m in mods]
    for m in mods:
        m.randn_tensor = tap
    try:
        yield tap
    finally:
        for m, orig in zip(mods, saved):
            m.randn_tensor = orig


# ----------------------------------------------------------------------------------------------
# 3. Reference images
# ----------------------------------------------------------------------------------------------

PROMPTS = [
    "a photo of a cat sitting on a windowsill",
    "a watercolor painting of a lighthouse at dusk",
    "an oil painting of a mountain lake, highly detailed",
    "a red sports car on a rainy street at night",
    "a bowl of fruit on a wooden table, studio lighting",
    "a castle in the clouds, fantasy art",
    "portrait of an old fisherman, dramatic light",
]
NEGATIVE = "blurry, low quality"


def image_cases():
    """All (model, scheduler, negative prompt) combinations plus the extra cases from the brief."""
    cases = []
    for model in ("sd1-tiny", "sd2-tiny"):
        short = model.split("-")[0]
        for si, sched in enumerate(SCHEDULERS):
            for neg in (None, NEGATIVE):
                cases.append(dict(
                    name=f"{short}-{sched}-{'neg' if neg else 'noneg'}", model=model,
                    prompt=PROMPTS[(si + (1 if neg else 0) + (3 if short == "sd2" else 0)) % len(PROMPTS)],
                    negative_prompt=neg, steps=4, guidance=7.5, scheduler=sched, width=64, height=64))
        cases.append(dict(name=f"{short}-nonsquare", model=model, prompt="a wide landscape with rolling hills",
                          negative_prompt=None, steps=4, guidance=7.5,
                          scheduler="euler" if short == "sd1" else "ddim", width=96, height=64))
        cases.append(dict(name=f"{short}-noguidance", model=model, prompt="a cozy cabin in a snowy forest",
                          negative_prompt=None, steps=2, guidance=1.0, scheduler="lcm", width=64, height=64))
    for i, c in enumerate(cases):
        c["seed"] = 1000 + i
    return cases


def to_uint8(images):
    """Exactly diffusers' numpy_to_pil conversion."""
    return (images * 255).round().astype("uint8")


def render_case(pipe, base_scheduler, case, **pipe_kwargs):
    lat = np.random.RandomState(case["seed"]).standard_normal(
        (1, 4, case["height"] // 8, case["width"] // 8)).astype(np.float32)
    noise_rs = np.random.RandomState(case["seed"] + 50000)
    tap = NoiseTap(lambda shape: noise_rs.standard_normal(shape).astype(np.float32))
    pipe.scheduler = convert_scheduler(base_scheduler, case["scheduler"])
    with tapped_noise(tap):
        images = pipe(case["prompt"], negative_prompt=case["negative_prompt"],
                      num_inference_steps=case["steps"], guidance_scale=case["guidance"],
                      height=case["height"], width=case["width"], latents=torch.from_numpy(lat),
                      output_type="np", **pipe_kwargs).images
    return lat, tap.draws, images


def make_images(pipes, ref_tokenizers):
    if os.path.isdir(IMAGES_DIR):
        shutil.rmtree(IMAGES_DIR)
    os.makedirs(IMAGES_DIR)
    base = {name: pipe.scheduler for name, pipe in pipes.items()}  # never chain conversions
    index = []
    print("reference images (values in [-1,1]):")
    for case in image_cases():
        pipe = pipes[case["model"]]
        # Sanity check: the tokenizer diffusers loaded agrees with the reference tokenizer on
        # these prompts, so images and token fixtures are consistent.
        for text in (case["prompt"], case["negative_prompt"] or ""):
            a = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids
            b = ref_tokenizers[case["model"]](text, padding="max_length", max_length=77, truncation=True).input_ids
            assert a == b, text
        lat, draws, images = render_case(pipe, base[case["model"]], case)
        name = case["name"]
        np.save(os.path.join(IMAGES_DIR, f"{name}.latents.npy"), lat)
        noise_file = None
        if draws:
            noise_file = f"{name}.noise.npy"
            np.save(os.path.join(IMAGES_DIR, noise_file), np.stack(draws))
        Image.fromarray(to_uint8(images)[0]).save(os.path.join(IMAGES_DIR, f"{name}.png"))
        x = images[0] * 2 - 1
        sat = ((images[0] <= 0) | (images[0] >= 1)).mean()
        print(f"  {name:28s} mean {x.mean():+.3f} std {x.std():.3f} saturated {sat:.3f} noise draws {len(draws)}")
        index.append(dict(name=name, model=case["model"], prompt=case["prompt"],
                          negative_prompt=case["negative_prompt"], steps=case["steps"],
                          guidance=case["guidance"], scheduler=case["scheduler"], width=case["width"],
                          height=case["height"], latents=f"{name}.latents.npy", noise=noise_file,
                          image=f"{name}.png"))
    write_json(os.path.join(IMAGES_DIR, "cases.json"), index, compact=True)
    prompt_sensitivity(pipes, base)
    return index


def prompt_sensitivity(pipes, base):
    """Same latents, different prompt: report how much the image changes (must be visible)."""
    for model, pipe in pipes.items():
        outs = []
        for prompt in ("a photo of a cat sitting on a windowsill", "a watercolor painting of a lighthouse at dusk"):
            case = dict(seed=4242, width=64, height=64, scheduler="ddim", prompt=prompt, negative_prompt=None,
                        steps=4, guidance=7.5)
            outs.append(to_uint8(render_case(pipe, base[model], case)[2]).astype(np.int32))
        diff = np.abs(outs[0] - outs[1])
        print(f"  [{model}] prompt change, same latents: mean |diff| {diff.mean():.1f}/255, max {diff.max()}")
        pipe.scheduler = base[model]


# ----------------------------------------------------------------------------------------------
# 4. Tokenizer cases
# ----------------------------------------------------------------------------------------------

def tokenizer_prompts():
    """Hand-picked edge cases plus templated variations (deterministic, >= 220)."""
    p = [
        "", " ", "   ", "\t", "\n", " \t\n ", "a", "A", "cat", "CAT", "Cat", "cAt",
        "a photo of a cat", "A Photo Of A Cat", "A PHOTO OF A CAT", "a photo of a cat.",
        "a photograph of an astronaut riding a horse",
        "masterpiece, best quality, ultra-detailed, 8k, cinematic lighting",
        "portrait of a woman, oil on canvas, by john singer sargent",
        "a cute corgi wearing sunglasses on the beach",
        "cyberpunk city street at night, neon signs, rain, reflections",
        "studio ghibli style landscape with rolling hills and a small red house",
        "  leading spaces", "trailing spaces   ", "  both sides  ",
        "multiple    spaces     between words", "tabs\tbetween\twords", "new\nlines\nhere",
        "mixed \t\n whitespace \r\n runs", "carriage\rreturn", "form\x0cfeed and\x0bvertical tab",
        "non\u00a0breaking\u00a0space", "em\u2003space and thin\u2009space", "ideographic\u3000space",
        "zero\u200bwidth\u200bspace", "soft\u00adhyphen", "bom\ufeffinside", "line\u2028separator",
        "control\x00null", "bell\x07char", "escape\x1b[31mred", "delete\x7fchar", "c1\x85next line",
        "replacement \ufffd char", "private use \ue000 char",
        # punctuation
        "hello!", "hello!!", "hello!!!", "wow!!! amazing!", "!", "!!", "!!!!!!!!", "!hello", "a ! b",
        "what?", "what?!", "really?!?!", "...", "wait...", "a--b", "a---b", "a -- b", "(((", ")))",
        "[[[test]]]", "{curly}", "<angle>", "semi;colon:colon", "comma,separated,list,of,words",
        "slash/and\\backslash", "pipe|pipe", "tilde~caret^", "at@sign", "percent 100%", "$5 and €10 and £3 and ¥100",
        "quotes \"double\" and 'single'", "`backticks`", "ellipsis … unicode", "em—dash and en–dash",
        "«guillemets» and „low quotes“", "‘curly single’ and “curly double”", "*asterisks* and _underscores_",
        "#hashtag #another_one", "@mention me", "a+b=c", "x*y/z", "1+1=2", "<>", "<|>", "<| |>",
        # apostrophes / contractions
        "it's", "IT'S", "don't", "DON'T", "you're", "we've", "i'm", "they'll", "he'd", "can't", "won't",
        "isn't it", "rock 'n' roll", "the cat's toy", "the cats' toys", "'quoted'", "''", "'s", "'t",
        "it’s", "don’t", "you’re", "O'Neil's pub", "ma'am", "y'all'd've",
        # numbers
        "1234", "3.14", "3.14159265358979", "1,000", "1,000,000", "2nd place", "1st 2nd 3rd 4th",
        "0", "007", "-5", "+5", "1e10", "1/2", "50%", "24/7", "1920x1080", "4k 8k 16k", "v1.5", "2.1",
        "the year 2024", "12:30pm", "phone 555-1234", "١٢٣ arabic digits", "²³ superscripts", "½ ¼ ¾",
        "Ⅻ roman numeral", "①②③ circled",
        # weights / prompt syntax
        "(masterpiece:1.2)", "((best quality))", "[low quality]", "(cat:1.5), (dog:0.8)",
        "a (red:1.3) car", "{{{epic}}}", "masterpiece, (detailed face:1.1), [blurry:0.5]",
        "art by greg_rutkowski and alphonse_mucha", "snake_case_words", "__double__underscores__",
        "BREAK", "cat BREAK dog", "<lora:add_detail:0.8>", "embedding:EasyNegative",
        # URLs / emails / markup
        "https://example.com/path?query=1&x=2", "http://www.example.org", "www.example.com",
        "user@example.com", "&amp;", "tom &amp; jerry", "&lt;tag&gt;", "&quot;quoted&quot;", "&#39;", "&#x27;",
        "&nbsp;", "<b>bold</b>", "<br/>", "<|startoftext|>", "<|endoftext|>",
        "a <|endoftext|> b", "<|startoftext|>hello<|endoftext|>", "<|ENDOFTEXT|>", "<|endoftext|>!",
        "hello<|endoftext|>world",
        # Unicode letters
        "café", "naïve", "über", "niño", "façade", "crème brûlée", "São Paulo", "Zürich", "Ærø", "smørrebrød",
        "Ångström", "İstanbul", "straße", "STRASSE", "ǅ titlecase", "ﬁ ligature", "Ｆｕｌｌｗｉｄｔｈ",
        "e\u0301 combining accent", "n\u0303", "Å vs A\u030a",
        "日本語", "日本語のテキスト", "東京タワー", "こんにちは", "カタカナ", "中文", "你好世界",
        "我爱北京天安门", "한국어", "안녕하세요", "mixed 日本 and english", "猫 cat 猫", "𠀀 ext-b",
        "Привет мир", "Москва", "ПРИВЕТ", "Ελληνικά", "αβγ δεζ", "ΑΒΓ", "مرحبا بالعالم", "العربية",
        "שלום", "हिन्दी", "ภาษาไทย", "Tiếng Việt", "ქართული", "Հայերեն",
        # emoji
        "🐱", "a cat 🐱", "🐱🐶", "🔥🔥🔥", "😀 smile", "👍", "👍🏽", "👍🏿 thumbs", "👩‍💻", "👨‍👩‍👧‍👦 family",
        "🏳️‍🌈", "🇯🇵", "🇺🇸 flag", "🇬🇧🇫🇷", "❤️", "❤", "♥", "☀️ sun", "✨ sparkles ✨", "🧑🏻‍🎨 artist",
        "emoji at end 🎉", "🎉emoji at start", "mid🎉emoji", "1️⃣ keycap", "©️ ®️ ™",
        "★☆✓✗→←↑↓", "♪♫", "∑∫∂√∞", "≤≥≠≈", "°C 25°", "µm and μm", "Ω ohm", "ℕℤℚℝ",
        # long prompts (> 77 tokens)
        ("a highly detailed photograph of a majestic lion resting on a rock in the golden savanna at sunset, "
         "warm light, shallow depth of field, bokeh, award winning wildlife photography, national geographic, "
         "sharp focus, 85mm lens, f/1.8, cinematic composition, dramatic clouds, dust particles in the air, "
         "rim lighting, ultra realistic, 8k resolution, trending on artstation"),
        ("masterpiece, best quality, " * 20).strip(),
        "cat " * 200,
        " ".join(f"word{i}" for i in range(100)),
        "supercalifragilisticexpialidocious " * 10,
        "a" * 500,
        "ab" * 300,
        "日本語" * 40,
        "🐱" * 60,
        ", ".join(["red", "green", "blue", "yellow", "purple", "orange"] * 12),
        "!" * 100,
        "hello! " * 40,
    ]
    # Exact length boundaries: N single-token words -> N + 2 ids with BOS/EOS.
    for n in (73, 74, 75, 76, 77, 78):
        p.append(" ".join(["cat"] * n))
    # Templated variations: subjects x styles x modifiers.
    subjects = ["a fox", "an owl", "the Eiffel Tower", "a robot", "two dogs", "a bowl of ramen",
                "Mount Fuji", "a vintage car", "an astronaut", "a dragon"]
    styles = ["oil painting", "pixel art", "3D render", "pencil sketch", "photo", "ukiyo-e", "low-poly",
              "watercolor"]
    mods = ["", ", 4k", ", trending on ArtStation", " (masterpiece:1.2)", ", f/2.8 50mm", " — dramatic!",
            ", ¡colorido!", " at night 🌙"]
    rs = np.random.RandomState(1234)
    for i in range(60):
        s, st, m = subjects[i % len(subjects)], styles[rs.randint(len(styles))], mods[rs.randint(len(mods))]
        p.append(f"{st} of {s}{m}")
    seen, out = set(), []
    for x in p:
        if x not in seen:
            seen.add(x)
            out.append(x)
    assert len(out) >= 220, len(out)
    return out


def make_tokenizer_cases(ref_tokenizers):
    """ids exactly as diffusers requests them (pad to 77, truncate) + untruncated length."""
    sd1, sd2 = ref_tokenizers["sd1-tiny"], ref_tokenizers["sd2-tiny"]
    cases = []
    for prompt in tokenizer_prompts():
        ids1 = sd1(prompt, padding="max_length", max_length=sd1.model_max_length, truncation=True).input_ids
        ids2 = sd2(prompt, padding="max_length", max_length=sd2.model_max_length, truncation=True).input_ids
        n1, n2 = len(sd1(prompt).input_ids), len(sd2(prompt).input_ids)
        assert len(ids1) == len(ids2) == 77
        # SD2 pads with "!", a special token, so a "!" in a prompt tokenizes on its own and the
        # lengths can differ; record SD1's, and SD2's only where it differs.
        cases.append({"prompt": prompt, "sd1": ids1, "sd2": ids2, "untruncated_len": n1,
                      **({"sd2_untruncated_len": n2} if n2 != n1 else {})})
    write_json(os.path.join(FIXTURES, "tokenizer_cases.json"), {
        "reference": (f"transformers {transformers.__version__} CLIPTokenizer (tokenizers-backed, transformers>=5 "
                      "semantics) loaded from <pipeline>/tokenizer, called as diffusers does: "
                      "tok(prompt, padding='max_length', max_length=77, truncation=True).input_ids; "
                      "untruncated_len = len(tok(prompt).input_ids) for the sd1 tokenizer "
                      "(sd2_untruncated_len only where it differs)"),
        "cases": cases,
    }, compact=True)
    print(f"tokenizer cases: {len(cases)} prompts (transformers {transformers.__version__} CLIPTokenizer)")


# ----------------------------------------------------------------------------------------------
# 5. Scheduler arrays
# ----------------------------------------------------------------------------------------------

SCHED_CONFIGS = {  # name -> (published config, source class)
    "sd15": (SD15_SCHEDULER, PNDMScheduler),
    "sd21v": (SD21V_SCHEDULER, DDIMScheduler),
    "turbo": (TURBO_SCHEDULER, EulerDiscreteScheduler),
}
SCHED_STEPS = (1, 4, 7)
ADD_NOISE_STARTS = ((4, 0.5), (7, 0.8))  # (steps, strength) of the add_noise cases


def tensor_list(t):
    return [f32(v) for v in t.detach().to(torch.float32).flatten().tolist()] if t is not None else None


def run_scheduler(sched, steps, sample, model_outputs, noise):
    """The loop from the brief, with the stochastic schedulers' noise popped from `noise` in order."""
    k = [0]

    def pop(shape):
        arr = noise[k[0]]
        k[0] += 1
        assert arr.shape == shape
        return arr

    tap = NoiseTap(pop)
    sched.set_timesteps(steps)
    timesteps = sched.timesteps.clone()
    sigmas = getattr(sched, "sigmas", None)
    sigmas = sigmas.clone() if isinstance(sigmas, torch.Tensor) else None
    init_sigma = float(sched.init_noise_sigma)
    x = torch.from_numpy(sample) * sched.init_noise_sigma
    with tapped_noise(tap):
        for i, t in enumerate(sched.timesteps):
            inp = sched.scale_model_input(x, t)
            eps = torch.from_numpy(model_outputs[i]) + 0.1 * inp
            x = sched.step(eps, t, x).prev_sample
    return timesteps, sigmas, init_sigma, len(tap.draws), x


def make_scheduler_arrays():
    if os.path.isdir(SCHED_DIR):
        shutil.rmtree(SCHED_DIR)
    os.makedirs(SCHED_DIR)
    rs = np.random.RandomState(777)
    sample = rs.standard_normal((1, 4, 8, 8)).astype(np.float32)
    model_outputs = rs.standard_normal((12, 1, 4, 8, 8)).astype(np.float32)
    noise = rs.standard_normal((12, 1, 4, 8, 8)).astype(np.float32)
    np.save(os.path.join(SCHED_DIR, "sample.npy"), sample)
    np.save(os.path.join(SCHED_DIR, "model_outputs.npy"), model_outputs)
    np.save(os.path.join(SCHED_DIR, "noise.npy"), noise)
    index = {"cases": [], "skipped": []}
    for cfg_name, (cfg, source_cls) in SCHED_CONFIGS.items():
        cfg_dir = os.path.join(SCHED_DIR, "configs", cfg_name)
        write_json(os.path.join(cfg_dir, "scheduler_config.json"), cfg)
        source = source_cls.from_pretrained(cfg_dir)  # fills in the source class's defaults
        for kiln_name in SCHEDULERS:
            for steps in SCHED_STEPS:
                key = dict(scheduler=kiln_name, config=cfg_name, steps=steps)
                try:
                    sched = convert_scheduler(source, kiln_name)
                    ts, sig, init_sigma, draws, x = run_scheduler(sched, steps, sample, model_outputs, noise)
                except Exception as e:  # diffusers rejects the combination
                    index["skipped"].append(dict(key, reason=f"{type(e).__name__}: {e}"))
                    continue
                if not torch.isfinite(x).all():
                    index["skipped"].append(dict(key, reason="non-finite result"))
                    continue
                fname = f"{kiln_name}-{cfg_name}-{steps}.json"
                write_json(os.path.join(SCHED_DIR, fname), dict(
                    key, timesteps=[float(v) for v in ts.tolist()], sigmas=tensor_list(sig),
                    init_noise_sigma=f32(init_sigma), noise_draws=draws, final=tensor_list(x)), compact=True)
                index["cases"].append(dict(key, file=fname, noise_draws=draws, n_timesteps=len(ts)))
    index["notes"] = ("Inputs: sample.npy [1,4,8,8], model_outputs.npy / noise.npy [12,1,4,8,8] (float32). "
                      "Each config is loaded with its source class (configs/<name>/scheduler_config.json) and "
                      "converted with Target.from_config(source.config, **extra); note that diffusers does NOT carry "
                      "over keys the source class filled from its own defaults (config._use_default_values, e.g. "
                      "timestep_spacing for sd15/sd21v), so the target uses its own default for those. "
                      "Floats are float32 values "
                      "written as the shortest decimal that round-trips to the same float32.")
    write_json(os.path.join(SCHED_DIR, "index.json"), index, compact=True)
    print(f"scheduler cases: {len(index['cases'])} written, {len(index['skipped'])} skipped")
    for s in index["skipped"]:
        print(f"  skipped {s['scheduler']}-{s['config']}-{s['steps']}: {s['reason']}")


def make_add_noise_arrays():
    """img2img/inpainting starts on the scheduler inputs: set_timesteps, get_timesteps' slice,
    set_begin_index, add_noise(sample, noise[0], timesteps[:1]), then the slice's steps with the
    inpainting mask blend (left half of the latent kept at add_noise(sample, noise[0], next t))."""
    sample = np.load(os.path.join(SCHED_DIR, "sample.npy"))
    model_outputs = np.load(os.path.join(SCHED_DIR, "model_outputs.npy"))
    noise = np.load(os.path.join(SCHED_DIR, "noise.npy"))
    x0, n0 = torch.from_numpy(sample), torch.from_numpy(noise[0])
    keep = torch.zeros((1, 1, 8, 8))
    keep[..., :4] = 1
    cases, skipped, arrays = [], [], []
    for cfg_name, (_, source_cls) in SCHED_CONFIGS.items():
        source = source_cls.from_pretrained(os.path.join(SCHED_DIR, "configs", cfg_name))
        for kiln_name in SCHEDULERS:
            for steps, strength in ADD_NOISE_STARTS:
                key = dict(scheduler=kiln_name, config=cfg_name, steps=steps, strength=strength)
                try:
                    sched = convert_scheduler(source, kiln_name)
                    sched.set_timesteps(steps)
                    t_start = max(steps - min(int(steps * strength), steps), 0)
                    begin = t_start * sched.order
                    timesteps = sched.timesteps[begin:]
                    if hasattr(sched, "set_begin_index"):
                        sched.set_begin_index(begin)
                    noisy = sched.add_noise(x0, n0, timesteps[:1])
                    draws = iter(noise[1:])
                    tap = NoiseTap(lambda shape: next(draws))
                    x = noisy
                    with tapped_noise(tap):
                        for i, t in enumerate(timesteps):
                            eps = torch.from_numpy(model_outputs[i]) + 0.1 * sched.scale_model_input(x, t)
                            x = sched.step(eps, t, x).prev_sample
                            kept = x0 if i == len(timesteps) - 1 else sched.add_noise(x0, n0, timesteps[i + 1:i + 2])
                            x = keep * kept + (1 - keep) * x
                except Exception as e:  # diffusers rejects the combination
                    skipped.append(dict(key, reason=f"{type(e).__name__}: {e}"))
                    continue
                cases.append(dict(key, begin=begin, calls=len(timesteps), noise_draws=len(tap.draws)))
                arrays.append(np.stack([noisy.numpy(), x.numpy()]))
    np.save(os.path.join(SCHED_DIR, "add_noise.npy"), np.stack(arrays).astype(np.float32))
    write_json(os.path.join(SCHED_DIR, "add_noise.json"), {
        "cases": cases, "skipped": skipped,
        "notes": ("add_noise.npy [case, (noisy start, final), 1, 4, 8, 8] on sample.npy / model_outputs.npy; "
                  "noise.npy[0] is add_noise's noise, the stochastic schedulers draw noise.npy[1:] in order. "
                  "begin = t_start * order as get_timesteps computes it; steps run over timesteps[begin:]; "
                  "after each step the left half (x < 4) is reset to add_noise(sample, noise[0], next timestep), "
                  "or to sample after the last step (StableDiffusionInpaintPipeline's 4-channel blend)."),
    }, compact=True)
    print(f"add_noise cases: {len(cases)} written, {len(skipped)} skipped")


# ----------------------------------------------------------------------------------------------
# 6. Image editing: img2img, inpainting, x4 upscaling
# ----------------------------------------------------------------------------------------------

EDIT_DIR = os.path.join(FIXTURES, "editing")

# The tiny pipelines share sd1-tiny's text encoder and tokenizer (and, for inpainting, its VAE)
# through relative symlinks, which diffusers and Kiln both follow; only the UNets (fp16) and the
# upscaler's factor-4 VAE are new.
INPAINT_UNET = dict(
    sample_size=8, in_channels=9, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
)
# Shaped like stabilityai/stable-diffusion-x4-upscaler's UNet (and diffusers' own upscaler test):
# no attention in the first block, linear projections, only_cross_attention, a noise-level table.
UPSCALER_UNET = dict(
    sample_size=32, in_channels=7, out_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8, use_linear_projection=True,
    only_cross_attention=(True, True, False), num_class_embeds=1000,
)
UPSCALER_VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=4, norm_num_groups=8,
    sample_size=128, scaling_factor=0.08333,
)
# The x4 upscaler's published scheduler and low_res_scheduler configs.
UPSCALER_SCHEDULER = dict(SD15_SCHEDULER, _class_name="DDIMScheduler", beta_start=0.0001, beta_end=0.02,
                          prediction_type="v_prediction")
LOW_RES_SCHEDULER = {
    "_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "scaled_linear", "beta_start": 0.0001,
    "clip_sample": False, "num_train_timesteps": 1000, "trained_betas": None, "variance_type": "fixed_small",
}

EDIT_PROMPT = "a small house on a green hill under an evening sky"
IMG2IMG_CASES = [  # (name, model, scheduler, strength, steps, guidance, negative prompt)
    ("img2img-ddim-0.8", "sd1-tiny", "ddim", 0.8, 5, 7.5, None),
    ("img2img-pndm-0.5", "sd1-tiny", "pndm", 0.5, 6, 7.5, None),
    ("img2img-euler-a-0.5", "sd1-tiny", "euler-a", 0.5, 6, 7.5, NEGATIVE),
    ("img2img-dpmpp-2m-0.8", "sd1-tiny", "dpmpp-2m", 0.8, 5, 7.5, NEGATIVE),
    ("img2img-lcm-0.5", "sd1-tiny", "lcm", 0.5, 4, 1.0, None),
    ("img2img-sd2-euler-0.8", "sd2-tiny", "euler", 0.8, 5, 7.5, None),
]
INPAINT_CASES = [  # (name, model, scheduler, strength, steps, guidance, mask blur)
    ("inpaint-9ch-pndm", "sd1-inpaint-tiny", "pndm", 1.0, 4, 7.5, 0),
    ("inpaint-9ch-euler-a-0.6", "sd1-inpaint-tiny", "euler-a", 0.6, 5, 7.5, 0),
    ("inpaint-9ch-dpmpp-2m-blur3", "sd1-inpaint-tiny", "dpmpp-2m", 1.0, 4, 7.5, 3),
    ("inpaint-blend-euler", "sd1-tiny", "euler", 1.0, 4, 7.5, 0),
    ("inpaint-blend-dpmpp-2m-0.75", "sd1-tiny", "dpmpp-2m", 0.75, 4, 7.5, 0),
    ("inpaint-blend-ddim-blur2", "sd1-tiny", "ddim", 1.0, 4, 7.5, 2),
]
UPSCALE_CASES = [  # (name, scheduler, steps, guidance, noise level)
    ("upscale-ddim", "ddim", 4, 7.5, 20),
    ("upscale-euler-a", "euler-a", 4, 1.0, 100),
]
# Modules whose randn_tensor draws the editing pipelines' noise, labelled by role.
EDIT_NOISE_MODULES = {
    "diffusers.models.autoencoders.vae": "encode",
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img": "latents",
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint": "latents",
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_upscale": "latents",
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_latent_upscale": "latents",
    "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img": "latents",
    "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint": "latents",
    **{m: "step" for m in NOISY_SCHEDULER_MODULES},
}


@contextlib.contextmanager
def labelled_noise(seed):
    """Every randn_tensor of the editing pipelines, drawn from one RandomState; yields the list of
    (role, array) in draw order."""
    rs = np.random.RandomState(seed)
    draws = []
    saved = {}
    for name, role in EDIT_NOISE_MODULES.items():
        mod = sys.modules[name]
        saved[name] = mod.randn_tensor

        def tap(shape, generator=None, device=None, dtype=None, layout=None, role=role):
            arr = rs.standard_normal(tuple(shape)).astype(np.float32)
            draws.append((role, arr))
            return torch.from_numpy(arr.copy()).to(device=device or "cpu", dtype=dtype or torch.float32)

        mod.randn_tensor = tap
    try:
        yield draws
    finally:
        for name, fn in saved.items():
            sys.modules[name].randn_tensor = fn


def edit_images():
    """The inputs: a 64x64 scene, a mask with grey levels on both sides of the 0.5 threshold and
    coloured patches (PIL luma decides), and the scene at 32x32 for the upscaler."""
    img = Image.new("RGB", (64, 64))
    draw = ImageDraw.Draw(img)
    for y in range(64):
        draw.line([(0, y), (63, y)], fill=(40 + 3 * y, 60 + y, 180 - 2 * y))
    draw.ellipse((-20, 36, 84, 100), fill=(60, 140, 50))
    draw.rectangle((22, 28, 40, 44), fill=(150, 80, 60))
    draw.polygon([(18, 30), (31, 18), (44, 30)], fill=(90, 40, 40))
    draw.ellipse((46, 6, 58, 18), fill=(250, 210, 90))
    mask = Image.new("RGB", (64, 64))
    draw = ImageDraw.Draw(mask)
    draw.ellipse((18, 14, 46, 50), fill=(255, 255, 255))
    draw.rectangle((2, 2, 9, 9), fill=(127, 127, 127))     # luma 127: kept
    draw.rectangle((54, 2, 61, 9), fill=(128, 128, 128))   # luma 128: repainted
    draw.rectangle((2, 54, 9, 61), fill=(255, 0, 0))       # luma 76: kept
    draw.rectangle((54, 54, 61, 61), fill=(0, 255, 0))     # luma 150: repainted
    return img, mask, img.resize((32, 32), Image.BICUBIC)


def link_components(out_dir, components):
    """Relative symlinks out_dir/<comp> -> ../sd1-tiny/<comp>, or, for a (comp, "model/folder")
    pair, -> ../model/folder."""
    for comp in components:
        comp, target = comp if isinstance(comp, tuple) else (comp, os.path.join("sd1-tiny", comp))
        os.symlink(os.path.join("..", target), os.path.join(out_dir, comp))


def save_edit_pipeline(pipe, out_dir, new_models, linked, schedulers):
    """save_pretrained with the new models' weights in fp16, then the shared components as
    symlinks (see link_components) and the published-style scheduler configs."""
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    for model in new_models:  # sd1-tiny's shared components stay float32 in memory
        model.to(torch.float16)
    pipe.save_pretrained(out_dir, safe_serialization=True, variant="fp16")
    for comp in linked:
        shutil.rmtree(os.path.join(out_dir, comp[0] if isinstance(comp, tuple) else comp))
    link_components(out_dir, linked)
    for folder, cfg in schedulers.items():
        write_json(os.path.join(out_dir, folder, "scheduler_config.json"), cfg)


def build_inpaint_pipeline(sd1):
    torch.manual_seed(300)
    unet = UNet2DConditionModel(**INPAINT_UNET)
    texture_init(unet, 302, {"attn2.to_out": CROSS_ATTN_OUT_GAIN})
    calibrate_unet(unet, sd1.text_encoder, sd1.tokenizer, 304)
    pipe = StableDiffusionInpaintPipeline(vae=sd1.vae, text_encoder=sd1.text_encoder, tokenizer=sd1.tokenizer,
                                          unet=unet, scheduler=sd1.scheduler, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    out_dir = os.path.join(FIXTURES, "sd1-inpaint-tiny")
    save_edit_pipeline(pipe, out_dir, (unet,), ("text_encoder", "tokenizer", "vae"), {"scheduler": SD15_SCHEDULER})
    return out_dir


def build_upscale_pipeline(sd1):
    torch.manual_seed(400)
    unet = UNet2DConditionModel(**UPSCALER_UNET)
    vae = AutoencoderKL(**UPSCALER_VAE)
    texture_init(unet, 402, {"attn2.to_out": CROSS_ATTN_OUT_GAIN})
    texture_init(vae, 403)
    calibrate_unet(unet, sd1.text_encoder, sd1.tokenizer, 404, class_labels=torch.tensor([20]))
    calibrate_vae(vae, 405)
    strip = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    pipe = StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=sd1.text_encoder, tokenizer=sd1.tokenizer, unet=unet,
        low_res_scheduler=DDPMScheduler.from_config(strip(LOW_RES_SCHEDULER)),
        scheduler=DDIMScheduler.from_config(strip(UPSCALER_SCHEDULER)), max_noise_level=350)
    out_dir = os.path.join(FIXTURES, "sd-x4-upscaler-tiny")
    save_edit_pipeline(pipe, out_dir, (unet, vae), ("text_encoder", "tokenizer"),
                       {"scheduler": UPSCALER_SCHEDULER, "low_res_scheduler": LOW_RES_SCHEDULER})
    return out_dir


def save_draws(name, draws, roles, out_dir=EDIT_DIR):
    """One .npy per role (draws of a role stacked, or the single draw); returns {role: file}."""
    files = {}
    for role in roles:
        arrs = [a for r, a in draws if r == role]
        if not arrs:
            continue
        fname = f"{name}.{role}.npy"
        np.save(os.path.join(out_dir, fname), np.stack(arrs) if role == "step" else arrs[0])
        files[role] = fname
    return files


def make_editing(sd_pipes):
    if os.path.isdir(EDIT_DIR):
        shutil.rmtree(EDIT_DIR)
    os.makedirs(EDIT_DIR)
    init, mask, low_res = edit_images()
    init.save(os.path.join(EDIT_DIR, "init.png"))
    mask.save(os.path.join(EDIT_DIR, "mask.png"))
    low_res.save(os.path.join(EDIT_DIR, "low_res.png"))
    # The pipelines read the images back from disk, as Kiln does.
    init, mask, low_res = (Image.open(os.path.join(EDIT_DIR, f)).convert("RGB")
                           for f in ("init.png", "mask.png", "low_res.png"))
    base = {name: pipe.scheduler for name, pipe in sd_pipes.items()}
    sd1 = sd_pipes["sd1-tiny"]
    inpaint_dir = build_inpaint_pipeline(sd1)
    upscale_dir = build_upscale_pipeline(sd1)
    pipes = dict(sd_pipes)
    pipes["sd1-inpaint-tiny"] = StableDiffusionInpaintPipeline.from_pretrained(
        inpaint_dir, variant="fp16", torch_dtype=torch.float32)
    upscaler = StableDiffusionUpscalePipeline.from_pretrained(upscale_dir, variant="fp16", torch_dtype=torch.float32)
    base["sd1-inpaint-tiny"] = pipes["sd1-inpaint-tiny"].scheduler
    base["sd-x4-upscaler-tiny"] = upscaler.scheduler
    assert upscaler.unet.config.num_class_embeds == 1000 and upscaler.vae.config.scaling_factor == 0.08333
    for p in list(pipes.values()) + [upscaler]:
        p.set_progress_bar_config(disable=True)

    index = []
    print("editing references:")

    def record(case, images, draws, roles):
        name = case["name"]
        files = save_draws(name, draws, roles)
        Image.fromarray(to_uint8(images)[0]).save(os.path.join(EDIT_DIR, f"{name}.png"))
        index.append(dict(case, image=f"{name}.png", noise=files))
        print(f"  {name:30s} draws {[r for r, _ in draws]}")

    for i, (name, model, sched, strength, steps, guidance, negative) in enumerate(IMG2IMG_CASES):
        pipe = StableDiffusionImg2ImgPipeline(**pipes[model].components)
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = convert_scheduler(base[model], sched)
        with labelled_noise(5000 + i) as draws:
            images = pipe(EDIT_PROMPT, image=init, strength=strength, num_inference_steps=steps,
                          guidance_scale=guidance, negative_prompt=negative, output_type="np").images
        assert [r for r, _ in draws][:2] == ["encode", "latents"]
        case = dict(name=name, mode="img2img", model=model, scheduler=sched, strength=strength, steps=steps,
                    guidance=guidance, prompt=EDIT_PROMPT, negative_prompt=negative, image_input="init.png")
        record(case, images, draws, ("encode", "latents", "step"))

    for i, (name, model, sched, strength, steps, guidance, blur) in enumerate(INPAINT_CASES):
        pipe = pipes[model]
        if model == "sd1-tiny":
            pipe = StableDiffusionInpaintPipeline(**pipe.components)
            pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = convert_scheduler(base[model], sched)
        mask_in = pipe.mask_processor.blur(mask, blur_factor=blur) if blur else mask
        with labelled_noise(6000 + i) as draws:
            images = pipe(EDIT_PROMPT, image=init, mask_image=mask_in, strength=strength, num_inference_steps=steps,
                          guidance_scale=guidance, height=64, width=64, output_type="np").images
        # Roles in draw order: [image encode,] latents (initial noise), masked-image encode, steps.
        roles = [r for r, _ in draws]
        first_encode = roles[0] == "encode"
        relabelled = []
        for k, (role, arr) in enumerate(draws):
            if role == "encode":
                role = "image_encode" if first_encode and k == 0 else "masked_encode"
            relabelled.append((role, arr))
        case = dict(name=name, mode="inpaint", model=model, scheduler=sched, strength=strength, steps=steps,
                    guidance=guidance, prompt=EDIT_PROMPT, negative_prompt=None, image_input="init.png",
                    mask="mask.png", mask_blur=blur)
        used = ("image_encode", "latents", "step") if model == "sd1-tiny" else (
            "image_encode", "latents", "masked_encode", "step")  # the blend never uses the masked image
        record(case, images, relabelled, used)

    for i, (name, sched, steps, guidance, noise_level) in enumerate(UPSCALE_CASES):
        upscaler.scheduler = convert_scheduler(base["sd-x4-upscaler-tiny"], sched)
        with labelled_noise(7000 + i) as draws:
            images = upscaler(EDIT_PROMPT, image=low_res, num_inference_steps=steps, guidance_scale=guidance,
                              noise_level=noise_level, output_type="np").images
        # The pipeline draws the low-res image's noise, then the initial latents.
        assert [r for r, _ in draws][:2] == ["latents", "latents"]
        relabelled = [("low_res", draws[0][1])] + draws[1:]
        case = dict(name=name, mode="upscale", model="sd-x4-upscaler-tiny", scheduler=sched, strength=None,
                    steps=steps, guidance=guidance, prompt=EDIT_PROMPT, negative_prompt=None,
                    image_input="low_res.png", noise_level=noise_level)
        record(case, images, relabelled, ("low_res", "latents", "step"))
    write_json(os.path.join(EDIT_DIR, "cases.json"), index)



# ----------------------------------------------------------------------------------------------
# 9. Prompts as Automatic1111 reads them (emphasis, BREAK, 75-token chunks)
# ----------------------------------------------------------------------------------------------
# A small reference written from A1111's documented defaults ("Original" emphasis, comma padding
# backtrack 20, cond/uncond not padded to each other), used for Kiln's prompt parity tests.
# Difference kept on purpose (and in Kiln): BREAK is only a chunk break outside brackets.

PROMPTS_DIR = os.path.join(FIXTURES, "prompts")
EMPHASIS_TOKEN = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")
CHUNK = 75
COMMA_BACKTRACK = 20


def reference_pieces(text):
    """[text, weight] pieces, neighbours of equal weight merged; [None, None] is a BREAK."""
    pieces, round_open, square_open = [], [], []

    def scale(start, factor):
        for piece in pieces[start:]:
            if piece[1] is not None:
                piece[1] *= factor

    for m in EMPHASIS_TOKEN.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\"):
            pieces.append([tok[1:], 1.0])
        elif tok == "(":
            round_open.append(len(pieces))
        elif tok == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            scale(round_open.pop(), float(weight))
        elif tok == ")" and round_open:
            scale(round_open.pop(), 1.1)
        elif tok == "]" and square_open:
            scale(square_open.pop(), 1 / 1.1)
        else:
            parts = [tok] if round_open or square_open else BREAK_WORD.split(tok)
            for i, part in enumerate(parts):
                if i:
                    pieces.append([None, None])
                pieces.append([part, 1.0])
    for start in round_open:
        scale(start, 1.1)
    for start in square_open:
        scale(start, 1 / 1.1)
    merged = []
    for piece in pieces:
        if merged and piece[1] is not None and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return merged or [["", 1.0]]


def reference_chunks(tokenizer, text):
    """(ids, weights) per 77-token chunk: start, up to 75 tokens, end, padding."""
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    chunks, state = [], dict(ids=[], weights=[], comma=None)

    def close():
        ids, weights = state["ids"], state["weights"]
        pad = CHUNK - len(ids)
        chunks.append(([tokenizer.bos_token_id] + ids + [tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad,
                       [1.0] + weights + [1.0] * (pad + 1)))
        state.update(ids=[], weights=[], comma=None)

    for text_piece, weight in reference_pieces(text):
        if text_piece is None:
            close()
            continue
        for tok in tokenizer(text_piece, add_special_tokens=False).input_ids:
            ids = state["ids"]
            if tok == comma:
                state["comma"] = len(ids)
            elif len(ids) == CHUNK and state["comma"] is not None and CHUNK - state["comma"] <= COMMA_BACKTRACK:
                cut = state["comma"] + 1
                moved = (ids[cut:], state["weights"][cut:])
                state["ids"], state["weights"] = ids[:cut], state["weights"][:cut]
                close()
                state["ids"], state["weights"] = list(moved[0]), list(moved[1])
            if len(state["ids"]) == CHUNK:
                close()
            state["ids"].append(tok)
            state["weights"].append(weight)
    if state["ids"] or not chunks:
        close()
    return chunks


def reference_states(pipe, text):
    """Text states [1, 77·chunks, D]: each chunk encoded, weighted, rescaled to its old mean."""
    states = []
    for ids, weights in reference_chunks(pipe.tokenizer, text):
        z = pipe.text_encoder(torch.tensor([ids]))[0]
        w = torch.tensor(weights, dtype=torch.float32).reshape(1, -1, 1)
        if (w != 1).any():
            before = z.mean()
            z = z * w
            z = z * (before / z.mean())
        states.append(z)
    return torch.cat(states, dim=1)


def guided_image(pipe, scheduler, cond, uncond, steps, guidance, latents):
    """diffusers' text-to-image loop, with the two predictions run apart (their lengths differ)."""
    scheduler.set_timesteps(steps)
    x = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        e_uncond = pipe.unet(inp, t, encoder_hidden_states=uncond).sample
        e_cond = pipe.unet(inp, t, encoder_hidden_states=cond).sample
        x = scheduler.step(e_uncond + guidance * (e_cond - e_uncond), t, x).prev_sample
    image = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


LONG_PLAIN = ", ".join([
    "a quiet harbour town at dawn", "fishing boats resting on calm water", "gulls circling above the masts",
    "old stone houses with blue shutters", "a winding road up the hill", "a lighthouse on the far cliff",
    "soft golden light through thin mist", "nets drying on the pier", "a cat asleep on a wooden crate",
    "lanterns still glowing in the windows", "a bakery opening its doors", "smoke rising from chimneys",
    "a church bell tower", "waves breaking gently on the rocks", "children running along the beach",
    "an old fisherman mending a sail", "painted in the style of an impressionist oil painting",
    "thick brush strokes", "warm and cool colours in balance", "highly detailed", "wide angle view",
])
LONG_EMPHASIS = ("a (quiet harbour town:1.3) at dawn, ((fishing boats)) on calm water, [gulls] above the masts, "
                 + LONG_PLAIN.split(", ", 3)[3] + ", (dramatic sky:0.8), [[[muted colours]]]")
PROMPT_IMAGE_CASES = [
    # name, model, scheduler, prompt, negative prompt, seed
    ("long-plain", "sd1-tiny", "euler", LONG_PLAIN, "", 3000),
    ("long-emphasis", "sd1-tiny", "euler", LONG_EMPHASIS, "blurry, (low quality:1.3)", 3001),
    ("break-paired", "sd2-tiny", "ddim", "a lighthouse on a cliff BREAK (stormy sea:1.4), [calm sky]",
     "blurry BREAK low quality", 3002),
    ("emphasis-short", "sd1-tiny", "euler", "a ((red)) car on a [[rainy]] street, (night:0.7)", "", 3003),
]
CHUNK_CASE_PROMPTS = [
    "", "a cat", "BREAK", "a BREAK b", "BREAK BREAK", "(a BREAK b)", "an (important) word",
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", "\\(literal\\] (unbalanced", "(x:+.5) [y",
    LONG_PLAIN, LONG_EMPHASIS, ", ".join(["word"] * 80), " ".join(["word"] * 200),
    " ".join(["word"] * 70) + ", " + " ".join(["more"] * 30),
    " ".join(["word"] * 74) + ", next, " + " ".join(["tail"] * 5),
]


def random_prompts(n, seed=4000):
    """Prompts made of the syntax's characters and words in random order, to compare parsers."""
    parts = ["(", ")", "[", "]", ":", ":1.5)", ": 0.8 )", ":1.2.3)", ":-1)", ":.)", "\\", "\\(", "\\)", "\\[",
             "\\]", "\\\\", " ", ",", "BREAK", " BREAK ", "BREAKS", "a", "cat", "0.5", "é", "\t"]
    rng = np.random.RandomState(seed)
    return ["".join(rng.choice(parts, size=rng.randint(0, 16))) for _ in range(n)]


def piece_case(prompt):
    """The reference's pieces of `prompt` ([text, weight], None for BREAK), or its error."""
    try:
        return dict(prompt=prompt, pieces=[None if t is None else [t, w] for t, w in reference_pieces(prompt)])
    except ValueError as e:
        return dict(prompt=prompt, error=str(e))


def make_prompts(pipes):
    """Pieces of random prompts, chunk ids and weights for both tokenizers, and images made with
    A1111's conditioning."""
    if os.path.isdir(PROMPTS_DIR):
        shutil.rmtree(PROMPTS_DIR)
    os.makedirs(PROMPTS_DIR)
    chunk_cases = []
    for prompt in CHUNK_CASE_PROMPTS:
        case = dict(prompt=prompt)
        for model in ("sd1-tiny", "sd2-tiny"):
            chunks = reference_chunks(pipes[model].tokenizer, prompt)
            case[model] = [dict(ids=ids, weights=[f32(w) for w in ws]) for ids, ws in chunks]
        chunk_cases.append(case)
    images = []
    print("prompt syntax references:")
    for name, model, scheduler_name, prompt, negative, seed in PROMPT_IMAGE_CASES:
        pipe = pipes[model]
        lat = np.random.RandomState(seed).standard_normal((1, 4, 8, 8)).astype(np.float32)
        cond, uncond = reference_states(pipe, prompt), reference_states(pipe, negative)
        scheduler = convert_scheduler(pipe.scheduler, scheduler_name)
        image = guided_image(pipe, scheduler, cond, uncond, 4, 7.5, torch.from_numpy(lat))
        np.save(os.path.join(PROMPTS_DIR, f"{name}.latents.npy"), lat)
        Image.fromarray(to_uint8(image)[0]).save(os.path.join(PROMPTS_DIR, f"{name}.png"))
        entry = dict(name=name, model=model, scheduler=scheduler_name, prompt=prompt, negative_prompt=negative,
                     steps=4, guidance=7.5, latents=f"{name}.latents.npy", image=f"{name}.png",
                     chunks=[cond.shape[1] // 77, uncond.shape[1] // 77])
        if name == "long-plain":  # what diffusers makes of it: the first 75 tokens only
            pipe.scheduler = scheduler
            truncated = pipe(prompt, negative_prompt=negative, num_inference_steps=4, guidance_scale=7.5,
                             height=64, width=64, latents=torch.from_numpy(lat), output_type="np").images
            Image.fromarray(to_uint8(truncated)[0]).save(os.path.join(PROMPTS_DIR, f"{name}.truncated.png"))
            entry["truncated"] = f"{name}.truncated.png"
        images.append(entry)
        print(f"  {name:16s} chunks {entry['chunks']}")
    pieces = [piece_case(p) for p in random_prompts(2000)]
    write_json(os.path.join(PROMPTS_DIR, "cases.json"), dict(pieces=pieces, chunks=chunk_cases, images=images),
               compact=True)


# ----------------------------------------------------------------------------------------------
# TAESD: the tiny autoencoder of the live preview
# ----------------------------------------------------------------------------------------------

TAESD_DIR = os.path.join(FIXTURES, "taesd-tiny")


def make_taesd():
    """A random AutoencoderTiny with TAESD's structure (4 levels, 3/3/3/1 decoder blocks, ReLU,
    nearest x2 upsampling) at 16 channels, and its decode of random latents. The latents are
    wider than tall, and large enough that the decoder's tanh clamp (at ±3) matters. PyTorch's
    default init fades the signal through the ReLUs to a flat image; He init, with each block's
    last conv scaled down so the residual sums stay in range, keeps a picture."""
    torch.manual_seed(7)
    vae = AutoencoderTiny(encoder_block_out_channels=(16,) * 4, decoder_block_out_channels=(16,) * 4).eval()
    for name, module in vae.decoder.named_modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if name.endswith("conv.4"):
                module.weight.mul_(0.3)
            if module is vae.decoder.layers[-1]:
                module.weight.mul_(0.05)
            if module.bias is not None:
                nn.init.uniform_(module.bias, -0.1, 0.1)
    vae.save_pretrained(TAESD_DIR)
    latents = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(8)) * 2.0
    decoded = vae.decode(latents).sample
    ref = os.path.join(TAESD_DIR, "reference")
    os.makedirs(ref, exist_ok=True)
    np.save(os.path.join(ref, "latents.npy"), latents.numpy().astype(np.float32))
    np.save(os.path.join(ref, "decoded.npy"), decoded.numpy().astype(np.float32))
    print(f"taesd-tiny: decoded {tuple(latents.shape)} -> {tuple(decoded.shape)}, "
          f"range [{decoded.min():.3f}, {decoded.max():.3f}], std {decoded.std():.3f}")


# ----------------------------------------------------------------------------------------------
# LoRA: kohya / A1111 and diffusers (PEFT) files, fused into the tiny pipelines by diffusers
# ----------------------------------------------------------------------------------------------

LORA_DIR = os.path.join(FIXTURES, "lora")
# A kohya alpha per module, as A1111 applies it: W + weight * (alpha / rank) * up @ down. diffusers
# (0.42) gives a module whose alpha is not the most common one in its model that common alpha
# instead, unless it is a UNet layer outside attention (attention's to_q/k/v/out, and any text
# encoder layer under transformers 5, miss their alpha_pattern entry). So those layers carry the
# common alpha (the first of `alphas`), only the UNet's other layers the second; check_fused
# holds diffusers' fused weights to A1111's formula.
ATTENTION_LAYER = re.compile(r".*(attn[12]\.to_(q|k|v|out\.0)|self_attn\.(q|k|v|out)_proj)")
SD_TRANSFORMER = r"\.(proj_in|proj_out|transformer_blocks\.0\.(attn[12]\.to_(q|k|v|out\.0)|ff\.net\.(0\.proj|2)))"
CLIP_LAYERS = r"encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])"
# Each file covers three of its UNet's transformers (the files stay small) and both CLIP layers;
# sd1-kohya adds a 3x3 LoCon conv.  sd1's proj_in/out are 1x1 convs, sd2's linear.  down is
# fan-in scaled, up N(0, gain^2 / rank) with gain = (UNet, text encoder), set so that each part
# visibly changes the images.
LORA_FILES = {
    "sd1-kohya.safetensors": dict(
        model="sd1-tiny", format="kohya", rank=4, seed=9000, alphas=(2.0, 8.0), alpha_dtype=torch.float32,
        unet=rf"(down_blocks\.0\.attentions\.0|mid_block\.attentions\.0|up_blocks\.2\.attentions\.2){SD_TRANSFORMER}"
             r"|down_blocks\.0\.resnets\.0\.conv1",
        text_encoder=CLIP_LAYERS, gain=(0.25, 0.25)),
    "sd1-peft.safetensors": dict(
        model="sd1-tiny", format="peft", rank=2, seed=9100,
        unet=r"(down_blocks\.1\.attentions\.1|mid_block\.attentions\.0|up_blocks\.1\.attentions\.0)"
             r"\.transformer_blocks\.0\.attn[12]\.to_(k|v|out\.0)",
        text_encoder=r"encoder\.layers\.\d+\.self_attn\.(q|v)_proj", gain=(0.25, 0.25)),
    # Alphas stored fp16, as sd-scripts writes them with --save_precision fp16.
    "sd2-kohya.safetensors": dict(
        model="sd2-tiny", format="kohya", rank=4, seed=9200, alphas=(8.0, 1.0), alpha_dtype=torch.float16,
        unet=rf"(down_blocks\.1\.attentions\.0|mid_block\.attentions\.0|up_blocks\.2\.attentions\.1){SD_TRANSFORMER}",
        text_encoder=CLIP_LAYERS, gain=(0.12, 0.05)),
}
LORA_CASES = [  # name, model, [(file, weight)] fused in order, scheduler, steps, guidance, prompt, negative
    ("sd1-kohya-0.8", "sd1-tiny", [("sd1-kohya.safetensors", 0.8)], "ddim", 5, 7.5, PROMPTS[0], NEGATIVE),
    ("sd1-peft-1.0", "sd1-tiny", [("sd1-peft.safetensors", 1.0)], "euler", 5, 7.5, PROMPTS[1], None),
    ("sd1-both", "sd1-tiny", [("sd1-kohya.safetensors", 0.8), ("sd1-peft.safetensors", -0.5)], "ddim", 4, 1.0,
     PROMPTS[2], None),
    ("sd2-kohya-1.0", "sd2-tiny", [("sd2-kohya.safetensors", 1.0)], "euler", 5, 7.5, PROMPTS[3], NEGATIVE),
]


def lora_targets(model, pattern):
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and re.fullmatch(pattern, name)]


def make_lora_file(pipe, fname, spec):
    """Write one random LoRA; returns {(component, module): delta of weight 1} for check_fused.

    Text encoder modules are named as in transformers 4 (`text_model.encoder...`), as published
    LoRAs name them; diffusers drops the prefix for transformers 5's CLIPTextModel (its
    CLIPTextModelWithProjection keeps it).  spec["components"]: the models it covers (default the
    UNet and the text encoder); spec["kohya_names"]: how a kohya file names them (default SD 1/2's).
    """
    gen = torch.Generator().manual_seed(spec["seed"])
    rank, tensors, deltas = spec["rank"], {}, {}
    components = spec.get("components", ("unet", "text_encoder"))
    for component, gain in zip(components, spec["gain"]):
        for name, m in lora_targets(getattr(pipe, component), spec[component]):
            w = m.weight
            down = (torch.randn((rank, *w.shape[1:]), generator=gen) / math.sqrt(w[0].numel())).half()
            up = (torch.randn((w.shape[0], rank, *([1, 1] if w.ndim == 4 else [])), generator=gen)
                  * gain / math.sqrt(rank)).half()
            full = name if component == "unet" or name.startswith("text_model.") else f"text_model.{name}"
            if spec["format"] == "kohya":
                if callable(spec["alphas"]):
                    alpha = spec["alphas"](component, name)
                else:
                    own = component == "unet" and not ATTENTION_LAYER.fullmatch(name)
                    alpha = spec["alphas"][1] if own else spec["alphas"][0]
                key = spec.get("kohya_names", sd_kohya_name)(pipe, component, full)
                tensors[f"{key}.lora_down.weight"] = down
                tensors[f"{key}.lora_up.weight"] = up
                tensors[f"{key}.alpha"] = torch.tensor(alpha, dtype=spec["alpha_dtype"])
            else:
                alpha = rank  # diffusers files carry no alpha
                tensors[f"{component}.{full}.lora_A.weight"] = down
                tensors[f"{component}.{full}.lora_B.weight"] = up
            delta = up.float().flatten(1) @ down.float().flatten(1)
            deltas[(component, name)] = delta.reshape(w.shape) * (alpha / rank)
    if spec["format"] == "kohya":
        from safetensors.torch import save_file
        save_file(tensors, os.path.join(LORA_DIR, fname))
    else:  # as a diffusers training script saves it
        layers = {f"{c}_lora_layers": {k.removeprefix(f"{c}."): v for k, v in tensors.items()
                                       if k.startswith(f"{c}.")} for c in components}
        cls = StableDiffusionXLPipeline if "text_encoder_2" in components else StableDiffusionPipeline
        cls.save_lora_weights(LORA_DIR, **layers, weight_name=fname)
    return deltas


def sd_kohya_name(pipe, component, full):
    """kohya's name of a module of SD 1/2 (its diffusers name, dots as underscores)."""
    return ("lora_unet_" if component == "unet" else "lora_te_") + full.replace(".", "_")


def fuse_loras(pipe, loras, only_unet=False):
    """load_lora_weights + fuse_lora + unload_lora_weights per file, in order: the deltas add.
    only_unet: the file's UNet part alone, to show what its text-encoder part does."""
    from safetensors.torch import load_file
    for i, (fname, weight) in enumerate(loras):
        name = f"lora{i}"
        if only_unet:
            sd = {k: v for k, v in load_file(os.path.join(LORA_DIR, fname)).items()
                  if k.startswith(("lora_unet_", "unet."))}
            pipe.load_lora_weights(sd, adapter_name=name)
        else:
            pipe.load_lora_weights(LORA_DIR, weight_name=fname, adapter_name=name)
        pipe.fuse_lora(lora_scale=weight, adapter_names=[name])
        pipe.unload_lora_weights()


def check_fused(pipe, before, loras, deltas, components=("unet", "text_encoder")):
    """Every fused weight is W + sum(weight * alpha / rank * up @ down); all else untouched."""
    expected = {}
    for fname, weight in loras:
        for (component, name), d in deltas[fname].items():
            key = f"{component}.{name}.weight"
            expected[key] = expected.get(key, 0) + weight * d
    for component in components:
        for name, p in getattr(pipe, component).named_parameters():
            key = f"{component}.{name}"
            got = p - before[key]
            if key not in expected:
                assert torch.equal(got, torch.zeros_like(got)), f"{key} changed"
                continue
            err = (got - expected[key]).abs().max().item()
            assert err <= 1e-4 * expected[key].abs().max().item(), f"{key}: fused delta off by {err:.2e}"
    return len(expected)


def lora_render(pipe, base_scheduler, case, lat):
    pipe.scheduler = convert_scheduler(base_scheduler, case["scheduler"])
    images = pipe(case["prompt"], negative_prompt=case["negative_prompt"], num_inference_steps=case["steps"],
                  guidance_scale=case["guidance"], height=case["height"], width=case["width"],
                  latents=torch.from_numpy(lat), output_type="np").images
    return to_uint8(images)[0]


def make_lora():
    """Random LoRAs in both file formats and diffusers' images with them fused.  Each render loads
    its pipeline afresh from disk, so no case sees another's LoRA."""
    import peft
    torch.set_num_threads(1)  # tiny models; leaves the other cores alone
    print(f"LoRA references: torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}")
    if os.path.isdir(LORA_DIR):
        shutil.rmtree(LORA_DIR)
    os.makedirs(LORA_DIR)
    fresh = lambda model: load_pipeline(os.path.join(FIXTURES, model), MODELS[model])  # noqa: E731
    deltas = {fname: make_lora_file(fresh(spec["model"]), fname, spec) for fname, spec in LORA_FILES.items()}
    write_json(os.path.join(LORA_DIR, "cases.json"), lora_cases(LORA_CASES, fresh, deltas, 8000))


def lora_cases(cases, fresh, deltas, seed, components=("unet", "text_encoder")):
    """Renders each case (latents from seed + its index) without and with its LoRAs fused, checks
    the fused weights, writes its latents and image; returns the cases.json entries."""
    index = []
    for i, (name, model, loras, scheduler, steps, guidance, prompt, negative) in enumerate(cases):
        case = dict(name=name, model=model, loras=[dict(file=f, weight=w) for f, w in loras], prompt=prompt,
                    negative_prompt=negative, scheduler=scheduler, steps=steps, guidance=guidance, width=64,
                    height=64, latents=f"{name}.latents.npy", image=f"{name}.png")
        lat = np.random.RandomState(seed + i).standard_normal((1, 4, 8, 8)).astype(np.float32)
        pipe = fresh(model)
        plain = lora_render(pipe, pipe.scheduler, case, lat)
        pipe = fresh(model)
        before = {f"{c}.{n}": p.clone() for c in components for n, p in getattr(pipe, c).named_parameters()}
        fuse_loras(pipe, loras)
        fused = check_fused(pipe, before, loras, deltas, components)
        image = lora_render(pipe, pipe.scheduler, case, lat)
        pipe = fresh(model)
        fuse_loras(pipe, loras, only_unet=True)
        unet_only = lora_render(pipe, pipe.scheduler, case, lat)
        diff = np.abs(image.astype(np.int32) - plain)
        te_diff = np.abs(image.astype(np.int32) - unet_only)
        np.save(os.path.join(LORA_DIR, case["latents"]), lat)
        Image.fromarray(image).save(os.path.join(LORA_DIR, case["image"]))
        index.append(dict(case, base_diff_mean=round(float(diff.mean()), 3), base_diff_max=int(diff.max())))
        print(f"  {name:14s} {fused:3d} fused weights  |lora - plain| mean {diff.mean():5.1f}/255 max {diff.max():3d}"
              f"  text encoder part: mean {te_diff.mean():5.1f}/255 max {te_diff.max():3d}")
        assert diff.mean() >= 8 and te_diff.mean() >= 2, "the LoRA barely changes the image"
    return index


# ----------------------------------------------------------------------------------------------
# SDXL: a tiny StableDiffusionXLPipeline (and SDXL-Turbo's layout) around a new SDXL-style UNet
# ----------------------------------------------------------------------------------------------
# sdxl-tiny pairs sd1-tiny's text encoder (quick_gelu, pads with <|endoftext|>) with sd2-tiny's
# (gelu, pads with "!"), as SDXL pairs CLIP ViT-L with OpenCLIP bigG; both through symlinks, like
# the VAE.  SDXL needs text_encoder_2 to be a CLIPTextModelWithProjection, so sd2-tiny's text
# encoder file also carries a text_projection.weight (SD 2 loads a CLIPTextModel and ignores it).

SDXL_REF_DIR = os.path.join(FIXTURES, "sdxl")
# Published scheduler_config.json of stabilityai/stable-diffusion-xl-base-1.0 and of
# stabilityai/sdxl-turbo, minus version tags.
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}
SDXL_TURBO_SCHEDULER = dict(SDXL_SCHEDULER, _class_name="EulerAncestralDiscreteScheduler",
                            timestep_spacing="trailing")
# SDXL base's UNet config, shrunk: no attention in the first block, per-block head counts (named
# attention_head_dim, as SDXL's config does), linear projections, more transformer layers deeper
# down (the mid block takes the last entry, 2), 64-d text (32 + 32), and the added "text_time"
# conditioning: te2's pooled output (32) and six time ids through an 8-d sinusoidal embedding.
SDXL_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32, 32),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2, transformer_layers_per_block=[1, 1, 2], attention_head_dim=[2, 4, 4],
    use_linear_projection=True, cross_attention_dim=64, addition_embed_type="text_time",
    addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=8,
    flip_sin_to_cos=True, freq_shift=0, upcast_attention=False,
)
SDXL_SEED = 500
ADD_EMBED_GAIN = 2.0  # add_embedding (pooled text + time ids): strong enough that both visibly matter
SDXL_LINKS = {  # sdxl-tiny's shared components -> their folders
    "text_encoder": "sd1-tiny/text_encoder", "tokenizer": "sd1-tiny/tokenizer",
    "text_encoder_2": "sd2-tiny/text_encoder", "tokenizer_2": "sd2-tiny/tokenizer", "vae": "sd1-tiny/vae",
}
SDXL_FILES = sorted(["model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
                     "unet/diffusion_pytorch_model.fp16.safetensors", *SDXL_LINKS])

SDXL_IMAGE_CASES = [  # name, model, scheduler, steps, guidance, prompt, negative prompt, width, height, seed
    # The first two share prompt and latents: they differ by the negative (force_zeros_for_empty_prompt).
    ("sdxl-euler-neg", "sdxl-tiny", "euler", 5, 5.0, PROMPTS[0], NEGATIVE, 64, 64, 1500),
    ("sdxl-euler-noneg", "sdxl-tiny", "euler", 5, 5.0, PROMPTS[0], None, 64, 64, 1500),
    ("sdxl-dpmpp-2m-wide", "sdxl-tiny", "dpmpp-2m", 4, 6.0, "a wide landscape with rolling hills", "blurry",
     96, 64, 1502),
    ("sdxl-noguidance", "sdxl-tiny", "euler", 4, 1.0, "a cozy cabin in a snowy forest", None, 64, 64, 1503),
    ("sdxl-turbo-1step", "sdxl-turbo-tiny", "euler-a", 1, 0.0, PROMPTS[5], None, 64, 64, 1504),
    ("sdxl-turbo-4step", "sdxl-turbo-tiny", "euler", 4, 0.0, PROMPTS[2], None, 64, 64, 1505),
]
SDXL_EDIT_CASES = [  # name, mode, scheduler, strength, steps, guidance, negative prompt
    ("sdxl-img2img-euler-0.6", "img2img", "euler", 0.6, 5, 5.0, None),
    ("sdxl-inpaint-ddim-0.8", "inpaint", "ddim", 0.8, 5, 5.0, "blurry"),
]


def add_text_projection(te_dir, seed):
    """Add a seeded text_projection.weight [projection_dim, hidden] (no bias, fp16 like the file) to
    te_dir's model.fp16.safetensors, every other tensor byte-identical; kept if already there.
    Scaled by 1/sqrt(hidden), so the pooled output has the final layer norm's std (~1)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    path = os.path.join(te_dir, "model.fp16.safetensors")
    with safe_open(path, "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
    if "text_projection.weight" in keys:
        return
    with open(os.path.join(te_dir, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["projection_dim"] == cfg["hidden_size"] == 32, cfg
    before = load_file(path)
    gen = torch.Generator().manual_seed(seed)
    proj = torch.randn((cfg["projection_dim"], cfg["hidden_size"]), generator=gen) / math.sqrt(cfg["hidden_size"])
    save_file(dict(before, **{"text_projection.weight": proj.half()}), path, metadata=metadata)
    after = load_file(path)
    assert set(after) == set(before) | {"text_projection.weight"}
    for k, v in before.items():
        assert after[k].dtype == v.dtype and after[k].numpy().tobytes() == v.numpy().tobytes(), k
    print(f"added text_projection.weight {tuple(proj.shape)} to {os.path.relpath(path, REPO_ROOT)}")


def load_text_encoder_2(te_dir):
    """sd2-tiny's text encoder as SDXL loads it: CLIPTextModelWithProjection, no key missing or left over."""
    te, info = CLIPTextModelWithProjection.from_pretrained(te_dir, variant="fp16", torch_dtype=torch.float32,
                                                            output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return te


def sdxl_text(pipe, prompt):
    """SDXL's conditioning as encode_prompt makes it: each encoder's penultimate hidden states
    (hidden_states[-2], no final layer norm) side by side, and text_encoder_2's text_embeds
    (final layer norm at the first <|endoftext|>, then text_projection) as the pooled embedding."""
    states = []
    for tok, te in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tok(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        out = te(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
    return torch.cat(states, dim=-1), out.text_embeds


def time_ids(height, width):
    """(original_size, crops_coords_top_left, target_size) as the SDXL pipelines default them."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)


def build_sdxl():
    """sdxl-tiny (new UNet, shared parts linked) and sdxl-turbo-tiny (its scheduler and index)."""
    sd1 = load_pipeline(os.path.join(FIXTURES, "sd1-tiny"), MODELS["sd1-tiny"])
    sd2_dir = os.path.join(FIXTURES, "sd2-tiny")
    torch.manual_seed(SDXL_SEED)
    unet = UNet2DConditionModel(**SDXL_UNET)
    texture_init(unet, SDXL_SEED + 2, {"attn2.to_out": CROSS_ATTN_OUT_GAIN, "add_embedding": ADD_EMBED_GAIN})
    strip = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    pipe = StableDiffusionXLPipeline(
        vae=sd1.vae, text_encoder=sd1.text_encoder,
        text_encoder_2=load_text_encoder_2(os.path.join(sd2_dir, "text_encoder")),
        tokenizer=sd1.tokenizer, tokenizer_2=CLIPTokenizer.from_pretrained(os.path.join(sd2_dir, "tokenizer")),
        unet=unet, scheduler=EulerDiscreteScheduler.from_config(strip(SDXL_SCHEDULER)),
        force_zeros_for_empty_prompt=True, add_watermarker=False)
    emb, pooled = sdxl_text(pipe, "a photo of a cat")
    calibrate_unet(unet, None, None, SDXL_SEED + 4, encoder_hidden_states=emb,
                   added_cond_kwargs=dict(text_embeds=pooled, time_ids=time_ids(64, 64)))
    links = list(SDXL_LINKS.items())
    save_edit_pipeline(pipe, os.path.join(FIXTURES, "sdxl-tiny"), (unet,), links, {"scheduler": SDXL_SCHEDULER})
    turbo = StableDiffusionXLPipeline(
        **{k: v for k, v in pipe.components.items() if k != "scheduler"},
        scheduler=EulerAncestralDiscreteScheduler.from_config(strip(SDXL_TURBO_SCHEDULER)),
        force_zeros_for_empty_prompt=False, add_watermarker=False)
    save_edit_pipeline(turbo, os.path.join(FIXTURES, "sdxl-turbo-tiny"), (),
                       [(c, f"sdxl-tiny/{c}") for c in ("unet", *SDXL_LINKS)], {"scheduler": SDXL_TURBO_SCHEDULER})
    for name, zeros in (("sdxl-tiny", True), ("sdxl-turbo-tiny", False)):
        out_dir = os.path.join(FIXTURES, name)
        with open(os.path.join(out_dir, "model_index.json")) as f:
            index = json.load(f)
        assert index["force_zeros_for_empty_prompt"] is zeros and index["_class_name"] == "StableDiffusionXLPipeline"
        for comp in ("feature_extractor", "image_encoder"):
            assert index.get(comp) == [None, None], (comp, index.get(comp))
        assert "add_watermarker" not in index, index


def load_sdxl(name):
    """Reload FROM DISK in float32 (the UNet from its fp16 file)."""
    out_dir = os.path.join(FIXTURES, name)
    # Files, and the linked folders by name (os.walk does not follow the links).
    got = sorted([os.path.relpath(os.path.join(d, f), out_dir) for d, _, fs in os.walk(out_dir) for f in fs]
                 + [c for c in os.listdir(out_dir) if os.path.islink(os.path.join(out_dir, c))])
    want = SDXL_FILES if name == "sdxl-tiny" else sorted(["model_index.json", "scheduler/scheduler_config.json",
                                                          "unet", *SDXL_LINKS])
    assert got == want, got
    pipe = StableDiffusionXLPipeline.from_pretrained(out_dir, variant="fp16", torch_dtype=torch.float32,
                                                     add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.text_encoder_2) is CLIPTextModelWithProjection and pipe.watermark is None
    assert pipe.tokenizer.pad_token_id == 49407 and pipe.tokenizer_2.pad_token_id == 0
    assert pipe.default_sample_size * pipe.vae_scale_factor == 64
    return pipe


@contextlib.contextmanager
def unet_calls(unet):
    """Records each UNet call's batch, timestep and added conditioning (time ids, pooled text)."""
    calls = []
    forward = unet.forward

    def recording(sample, timestep, *args, added_cond_kwargs=None, **kwargs):
        calls.append(dict(batch=sample.shape[0], t=float(timestep), time_ids=added_cond_kwargs["time_ids"].tolist(),
                          text_embeds=added_cond_kwargs["text_embeds"].clone()))
        return forward(sample, timestep, *args, added_cond_kwargs=added_cond_kwargs, **kwargs)

    unet.forward = recording
    try:
        yield calls
    finally:
        del unet.forward


def describe_calls(calls):
    """One line: the distinct time ids rows, and whether an unconditional pooled embedding is zero."""
    rows = sorted({tuple(int(v) for v in row) for c in calls for row in c["time_ids"]})
    first = calls[0]
    uncond = (f", uncond pooled {'zeros' if not first['text_embeds'][0].abs().max() else 'encoded'}"
              if first["batch"] == 2 else "")
    return f"{len(calls)} UNet calls, batch {first['batch']}, time ids {rows}{uncond}"


def sdxl_stats(pipe):
    """UNet output scale, and what the text, the pooled text and the time ids each change."""
    unet = pipe.unet
    x = torch.from_numpy(np.random.RandomState(7).standard_normal((1, 4, 8, 8)).astype(np.float32))
    prompts = ("a photo of a cat", "a watercolor of a dog", "")
    (e_cat, p_cat), (e_dog, _), (e_unc, _) = (sdxl_text(pipe, p) for p in prompts)
    print(f"  [sdxl-tiny] pooled text_embeds std {p_cat.std():.3f}, text states std {e_cat.std():.3f}")
    run = lambda e, p, ids: unet(x, t, encoder_hidden_states=e,  # noqa: E731
                                 added_cond_kwargs=dict(text_embeds=p, time_ids=ids)).sample
    for t in (1, 500, 981):
        o = run(e_cat, p_cat, time_ids(64, 64))
        d = {"cond-uncond": o - run(e_unc, torch.zeros_like(p_cat), time_ids(64, 64)),
             "cat-dog": o - run(e_dog, p_cat, time_ids(64, 64)),
             "pooled-zeros": o - run(e_cat, torch.zeros_like(p_cat), time_ids(64, 64)),
             "ids 64x64-64x96": o - run(e_cat, p_cat, time_ids(64, 96))}
        print(f"  [sdxl-tiny] unet t={t:4d}: out std {o.std():.3f}  " + "  ".join(f"|{k}| std {v.std():.3f}"
                                                                             for k, v in d.items()))


def make_sdxl():
    """sdxl-tiny, sdxl-turbo-tiny and their references in sdxl/ (images.json, editing.json)."""
    torch.set_num_threads(1)  # tiny models; leaves the other cores alone
    sd2_dir = os.path.join(FIXTURES, "sd2-tiny")
    minify_json(os.path.join(sd2_dir, "tokenizer", "tokenizer.json"))
    add_text_projection(os.path.join(sd2_dir, "text_encoder"), SDXL_SEED + 1)
    build_sdxl()
    pipes = {name: load_sdxl(name) for name in ("sdxl-tiny", "sdxl-turbo-tiny")}
    base = {name: pipe.scheduler for name, pipe in pipes.items()}
    assert type(base["sdxl-turbo-tiny"]) is EulerAncestralDiscreteScheduler
    assert base["sdxl-turbo-tiny"].config.timestep_spacing == "trailing"
    sdxl = pipes["sdxl-tiny"]
    for prompt in ("a photo of a cat", ""):  # sdxl_text (used to calibrate) is what encode_prompt does
        emb, pooled = sdxl_text(sdxl, prompt)
        ref = sdxl.encode_prompt(prompt, do_classifier_free_guidance=False)
        assert torch.equal(emb, ref[0]) and torch.equal(pooled, ref[2])
    print("sdxl-tiny: saved to tests/fixtures/sdxl-tiny (+ sdxl-turbo-tiny)")
    sdxl_stats(sdxl)
    if os.path.isdir(SDXL_REF_DIR):
        shutil.rmtree(SDXL_REF_DIR)
    os.makedirs(SDXL_REF_DIR)

    print("SDXL reference images:")
    index, rendered = [], {}
    for name, model, sched, steps, guidance, prompt, negative, width, height, seed in SDXL_IMAGE_CASES:
        case = dict(name=name, model=model, prompt=prompt, negative_prompt=negative, steps=steps, guidance=guidance,
                    scheduler=sched, width=width, height=height, seed=seed)
        with unet_calls(pipes[model].unet) as calls:
            lat, draws, images = render_case(pipes[model], base[model], case)
        np.save(os.path.join(SDXL_REF_DIR, f"{name}.latents.npy"), lat)
        noise_file = None
        if draws:
            noise_file = f"{name}.noise.npy"
            np.save(os.path.join(SDXL_REF_DIR, noise_file), np.stack(draws))
        image = to_uint8(images)[0]
        Image.fromarray(image).save(os.path.join(SDXL_REF_DIR, f"{name}.png"))
        rendered[name] = image.astype(np.int32)
        flat = np.abs(rendered[name] - rendered[name].mean(axis=(0, 1))).mean()
        print(f"  {name:20s} |image - its mean colour| {flat:5.1f}/255  noise draws {len(draws)}  "
              f"{describe_calls(calls)}")
        assert flat >= 10, "a flat image"
        del case["seed"]
        index.append(dict(case, latents=f"{name}.latents.npy", noise=noise_file, image=f"{name}.png"))
    write_json(os.path.join(SDXL_REF_DIR, "images.json"), index)
    pairs = [(a, b) for i, a in enumerate(rendered) for b in list(rendered)[i + 1:]
             if rendered[a].shape == rendered[b].shape]
    for a, b in pairs:
        diff = np.abs(rendered[a] - rendered[b])
        if a == "sdxl-euler-neg" and b == "sdxl-euler-noneg":
            print(f"  {a} vs {b} (same prompt and latents): mean |diff| {diff.mean():.1f}/255")
        assert diff.mean() >= 3, (a, b)
    print(f"  any two other cases of a size: mean |diff| >= "
          f"{min(np.abs(rendered[a] - rendered[b]).mean() for a, b in pairs):.1f}/255")
    # The time ids matter: the wide case again with a 64x64 image's original and target sizes.
    wide = next(c for c in index if c["name"] == "sdxl-dpmpp-2m-wide")
    seed = next(c[-1] for c in SDXL_IMAGE_CASES if c[0] == wide["name"])
    with unet_calls(sdxl.unet) as calls:
        other = render_case(sdxl, base["sdxl-tiny"], dict(wide, seed=seed), original_size=(64, 64),
                            target_size=(64, 64))[2]
    diff = np.abs(to_uint8(other)[0].astype(np.int32) - rendered[wide["name"]])
    print(f"  {wide['name']} with time ids of 64x64 ({describe_calls(calls)}): "
          f"mean |diff| {diff.mean():.1f}/255, max {diff.max()}")
    assert diff.mean() >= 4, "the time ids barely change the image"

    print("SDXL editing references:")
    init, mask = (Image.open(os.path.join(EDIT_DIR, f)).convert("RGB") for f in ("init.png", "mask.png"))
    edit_index = []
    for i, (name, mode, sched, strength, steps, guidance, negative) in enumerate(SDXL_EDIT_CASES):
        cls = StableDiffusionXLImg2ImgPipeline if mode == "img2img" else StableDiffusionXLInpaintPipeline
        pipe = cls(**sdxl.components, requires_aesthetics_score=False,
                   force_zeros_for_empty_prompt=sdxl.config.force_zeros_for_empty_prompt, add_watermarker=False)
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = convert_scheduler(base["sdxl-tiny"], sched)
        # diffusers' SDXL defaults differ from SD's (strength 0.9999 for inpainting, denoising_start/end,
        # padding_mask_crop, aesthetic scores): everything explicit.
        kwargs = dict(image=init, strength=strength, num_inference_steps=steps, guidance_scale=guidance,
                      negative_prompt=negative, denoising_start=None, denoising_end=None, output_type="np")
        case = dict(name=name, mode=mode, model="sdxl-tiny", scheduler=sched, strength=strength, steps=steps,
                    guidance=guidance, prompt=EDIT_PROMPT, negative_prompt=negative, image_input="init.png")
        with labelled_noise(5500 + i) as draws, unet_calls(pipe.unet) as calls:
            if mode == "img2img":
                images = pipe(EDIT_PROMPT, **kwargs).images
            else:
                images = pipe(EDIT_PROMPT, mask_image=mask, height=64, width=64, padding_mask_crop=None,
                              **kwargs).images
        roles = [r for r, _ in draws]
        if mode == "img2img":
            assert roles[:2] == ["encode", "latents"], roles
            used = ("encode", "latents", "step")
        else:
            # The 4-channel UNet: image encode, latents, masked-image encode (unused by the blend), steps.
            assert roles[:3] == ["encode", "latents", "encode"], roles
            draws = [("image_encode" if k == 0 else "masked_encode" if r == "encode" else r, a)
                     for k, (r, a) in enumerate(draws)]
            used = ("image_encode", "latents", "step")
            case.update(mask="mask.png", mask_blur=0)
        files = save_draws(name, draws, used, SDXL_REF_DIR)
        image = to_uint8(images)[0]
        Image.fromarray(image).save(os.path.join(SDXL_REF_DIR, f"{name}.png"))
        edit_index.append(dict(case, image=f"{name}.png", noise=files))
        init_diff = np.abs(image.astype(np.int32) - np.asarray(init, dtype=np.int32)).mean()
        print(f"  {name:24s} draws {[r for r, _ in draws]}  |output - input| {init_diff:.1f}/255  "
              f"{describe_calls(calls)}")
    write_json(os.path.join(SDXL_REF_DIR, "editing.json"), edit_index)


# ----------------------------------------------------------------------------------------------
# SDXL LoRA: kohya's SDXL file (Stability's original UNet names) and a diffusers/PEFT one, for
# sdxl-tiny, in lora/ (files and cases named sdxl-*; `--only lora-sdxl` remakes just those)
# ----------------------------------------------------------------------------------------------

RESNET_SGM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
              "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def sgm_unet_name(unet, name):
    """A diffusers UNet module name in Stability's original (SGM/LDM) UNet, which kohya's SDXL
    LoRAs name: down block b's resnet / attention i is input_blocks.(1 + (L+1) b + i).(0 / 1), its
    downsampler input_blocks.((L+1) (b+1)).0.op; the mid block's resnet 0, attention, resnet 1 are
    middle_block.0 / .1 / .2; up block b's resnet / attention i is output_blocks.((L+1) b + i).(0 / 1),
    its upsampler output_blocks.((L+1) b + L).(2 if the block has attentions else 1).conv, where L is
    layers_per_block.  Resnet internals are renamed (RESNET_SGM); transformer internals keep theirs."""
    per = unet.config.layers_per_block + 1
    m = re.fullmatch(r"(down_blocks|up_blocks|mid_block)\.(?:(\d+)\.)?(resnets|attentions|downsamplers|upsamplers)"
                     r"\.(\d+)\.(.+)", name)
    assert m, name
    where, b, kind, i, rest = m.group(1), int(m.group(2) or 0), m.group(3), int(m.group(4)), m.group(5)
    if kind == "resnets":
        first, _, tail = rest.partition(".")
        rest = ".".join(filter(None, (RESNET_SGM[first], tail)))
    if where == "down_blocks":
        if kind == "downsamplers":
            assert rest == "conv", name
            return f"input_blocks.{per * (b + 1)}.0.op"
        return f"input_blocks.{1 + per * b + i}.{int(kind == 'attentions')}.{rest}"
    if where == "mid_block":
        n = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}[kind, i]
        return f"middle_block.{n}.{rest}"
    if kind == "upsamplers":
        has_attn = hasattr(unet.up_blocks[b], "attentions")
        return f"output_blocks.{per * b + per - 1}.{2 if has_attn else 1}.{rest}"
    return f"output_blocks.{per * b + i}.{int(kind == 'attentions')}.{rest}"


def sdxl_kohya_name(pipe, component, full):
    """kohya's SDXL names: lora_unet_ + the SGM name, lora_te1_ / lora_te2_ + the text encoder's."""
    if component == "unet":
        return "lora_unet_" + sgm_unet_name(pipe.unet, full).replace(".", "_")
    return {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}[component] + full.replace(".", "_")


def sdxl_kohya_alpha(component, name):
    """Alphas 2, 4, 8 (rank 4) by layer.  diffusers' alpha workaround (see LORA_FILES): the UNet's
    attention projections carry its common alpha (4; they are the most numerous), each text
    encoder one alpha for all its layers (te1 2, te2 8); the other UNet layers vary."""
    if component != "unet":
        return {"text_encoder": 2.0, "text_encoder_2": 8.0}[component]
    if ATTENTION_LAYER.fullmatch(name):
        return 4.0
    if re.search(r"(proj_in|proj_out|conv2|conv_shortcut|upsamplers\.0\.conv)$", name):
        return 2.0
    return 8.0  # ff, conv1, time_emb_proj, the downsampler


SDXL_BLOCK_LAYERS = r"(attn[12]\.to_(q|k|v|out\.0)|ff\.net\.(0\.proj|2))"
SDXL_TRANSFORMER = rf"\.(proj_in|proj_out|transformer_blocks\.\d\.{SDXL_BLOCK_LAYERS})"
SDXL_LORA_FILES = {
    # Transformers of the down path (input_blocks.4.1), the mid block (middle_block.1, both transformer
    # layers), the up path (output_blocks.0.1: proj_in/out and its second layer; output_blocks.3.1);
    # a resnet's 3x3 conv1
    # (LoCon), time_emb_proj and 1x1 conv_shortcut (input_blocks.4.0), the mid block's last conv2,
    # the last up resnet's conv2 (output_blocks.8.0), the first downsampler (input_blocks.3.0.op) and
    # an upsampler (output_blocks.5.2.conv); every layer of both text encoders.  fp16, as sd-scripts
    # saves with --save_precision fp16.
    "sdxl-kohya.safetensors": dict(
        model="sdxl-tiny", format="kohya", rank=4, seed=9300, alphas=sdxl_kohya_alpha, alpha_dtype=torch.float16,
        components=("unet", "text_encoder", "text_encoder_2"), kohya_names=sdxl_kohya_name,
        unet=rf"(down_blocks\.1\.attentions\.0|mid_block\.attentions\.0|up_blocks\.1\.attentions\.0){SDXL_TRANSFORMER}"
             rf"|up_blocks\.0\.attentions\.0\.(proj_in|proj_out|transformer_blocks\.1\.{SDXL_BLOCK_LAYERS})"
             r"|down_blocks\.1\.resnets\.0\.(conv1|time_emb_proj|conv_shortcut)|mid_block\.resnets\.1\.conv2"
             r"|up_blocks\.2\.resnets\.2\.conv2|down_blocks\.0\.downsamplers\.0\.conv"
             r"|up_blocks\.1\.upsamplers\.0\.conv",
        text_encoder=CLIP_LAYERS, text_encoder_2=rf"text_model\.{CLIP_LAYERS}", gain=(0.25, 0.25, 0.25)),
    "sdxl-peft.safetensors": dict(
        model="sdxl-tiny", format="peft", rank=2, seed=9400, components=("unet", "text_encoder", "text_encoder_2"),
        unet=r"(down_blocks\.1\.attentions\.0|mid_block\.attentions\.0|up_blocks\.0\.attentions\.1)"
             r"\.transformer_blocks\.\d\.(attn[12]\.to_(k|v|out\.0)|ff\.net\.2)",
        text_encoder=r"encoder\.layers\.\d+\.self_attn\.(q|v)_proj",
        # diffusers (0.42) cannot load a PEFT text encoder part without attention projections
        # (convert_state_dict_to_peft: "Could not automatically infer state dict type"), so te2 has some.
        text_encoder_2=r"text_model\.encoder\.layers\.\d+\.(self_attn\.(k|out)_proj|mlp\.fc1)",
        gain=(0.25, 0.25, 0.25)),
}
SDXL_LORA_CASES = [  # as LORA_CASES
    ("sdxl-kohya-0.7", "sdxl-tiny", [("sdxl-kohya.safetensors", 0.7)], "euler", 4, 5.0, PROMPTS[4], "blurry"),
    ("sdxl-peft-1.0", "sdxl-tiny", [("sdxl-peft.safetensors", 1.0)], "euler", 4, 5.0, PROMPTS[6], None),
]


def check_sgm_names(pipe, fname, deltas):
    """Every UNet key of a kohya SDXL file is an SGM name, and sgm_unet_name is one-to-one on them
    (check_fused then shows that diffusers puts each on the module sgm_unet_name came from)."""
    from safetensors import safe_open
    with safe_open(os.path.join(LORA_DIR, fname), "pt") as f:
        keys = {k.split(".")[0] for k in f.keys()}
    unet = {k for k in keys if k.startswith("lora_unet_")}
    want = {"lora_unet_" + sgm_unet_name(pipe.unet, n).replace(".", "_") for c, n in deltas if c == "unet"}
    assert unet == want and len(want) == sum(c == "unet" for c, _ in deltas), (unet ^ want)
    assert all(re.match(r"lora_unet_(input_blocks_\d+_\d|middle_block_\d|output_blocks_\d+_\d)_", k) for k in unet)
    assert not any(b in k for k in unet for b in ("down_blocks", "mid_block", "up_blocks", "resnets", "attentions"))
    return len(unet)


def make_lora_sdxl():
    """The sdxl-* LoRA files and cases in lora/ (made after lora/'s others, whose files and cases.json
    entries stay as they are)."""
    import peft
    torch.set_num_threads(1)  # tiny models; leaves the other cores alone
    print(f"SDXL LoRA references: torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"peft {peft.__version__}")
    os.makedirs(LORA_DIR, exist_ok=True)
    for f in os.listdir(LORA_DIR):
        if f.startswith("sdxl-"):
            os.remove(os.path.join(LORA_DIR, f))
    components = ("unet", "text_encoder", "text_encoder_2")
    deltas = {fname: make_lora_file(load_sdxl(spec["model"]), fname, spec)
              for fname, spec in SDXL_LORA_FILES.items()}
    for fname in SDXL_LORA_FILES:  # safetensors writes them through 0600 temporary files
        os.chmod(os.path.join(LORA_DIR, fname), 0o644)
    pipe = load_sdxl("sdxl-tiny")
    for fname, spec in SDXL_LORA_FILES.items():
        if spec["format"] == "kohya":
            print(f"  {fname}: {check_sgm_names(pipe, fname, deltas[fname])} UNet keys in SGM names")
    new = lora_cases(SDXL_LORA_CASES, load_sdxl, deltas, 8100, components)
    index_path = os.path.join(LORA_DIR, "cases.json")
    index = []
    if os.path.exists(index_path):
        with open(index_path) as f:
            index = [c for c in json.load(f) if not c["name"].startswith("sdxl-")]
    write_json(index_path, index + new)


# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# The latent x2 upscaler: a tiny StableDiffusionLatentUpscalePipeline, and its UNet's structure
# ----------------------------------------------------------------------------------------------
# diffusers wires K-diffusion up blocks by coincidences of widths: the first up block must have
# in == out == the time embedding's width (it self-attends and takes no skip), later ones must not.
# Two blocks of 32 channels with a 32-wide time embedding is the smallest such UNet.  The
# published one (4 blocks, 2 layers, widening blocks, per-block head widths) is too large to
# store even tiny, so its structure is checked with weights from a formula (formula_tensor) that
# Kiln's test computes the same way: only the tensor names, shapes and diffusers' output are kept.

LATENT_DIR = os.path.join(FIXTURES, "latent-upscale")
# stabilityai/sd-x2-latent-upscaler's scheduler_config.json, minus version tags.
LATENT_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "interpolation_type": "log_linear", "num_train_timesteps": 1000,
    "prediction_type": "sample", "steps_offset": 1, "trained_betas": None,
}
LATENT_UNET_COMMON = dict(
    act_fn="gelu", norm_num_groups=None, conv_in_kernel=1, conv_out_kernel=1, cross_attention_dim=32,
    in_channels=8, out_channels=5, mid_block_type=None, resnet_time_scale_shift="scale_shift",
    time_embedding_type="fourier", timestep_post_act="gelu", time_cond_proj_dim=128 + 32, sample_size=None,
)
LATENT_UNET = dict(
    LATENT_UNET_COMMON, block_out_channels=(32, 32), layers_per_block=1, attention_head_dim=8,
    time_embedding_dim=32, down_block_types=("KDownBlock2D", "KCrossAttnDownBlock2D"),
    up_block_types=("KCrossAttnUpBlock2D", "KUpBlock2D"),
)
# The published UNet's structure, narrow: up block i takes attention_head_dim[i] (not its mirror's).
LATENT_UNET_FULL = dict(
    LATENT_UNET_COMMON, block_out_channels=(32, 32, 64, 64), layers_per_block=2, attention_head_dim=[8, 16, 16, 32],
    time_embedding_dim=64,
    down_block_types=("KDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D"),
    up_block_types=("KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KUpBlock2D"),
)
# The formula UNet's call: inputs by name and shape (values from name_uniforms), batch 2.
LATENT_UNET_INPUTS = {"sample": [2, 8, 16, 16], "context": [2, 8, 32], "cond": [2, 160]}
LATENT_SEED = 600
LATENT_CASES = [  # name, steps, guidance, negative prompt, input
    ("latent-x2-guided", 4, 7.0, "blurry", "image"),
    # A text-to-image result's latents (sd1-tiny, output_type="latent"), at guidance 0: the prompt becomes "".
    ("latent-x2-txt2img-guidance0", 3, 0.0, None, "txt2img latents"),
]


def name_uniforms(name, shape):
    """Uniforms in [-1, 1) for tensor `name`: splitmix64 of (FNV-1a of the name + index), as
    Kiln's random weights (weights.rs) draw them."""
    seed = 0xCBF29CE484222325
    for byte in name.encode():
        seed = ((seed ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + np.arange(int(np.prod(shape)), dtype=np.uint64)
        z = z * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return ((z >> np.uint64(40)).astype(np.float64) / 2.0 ** 24 * 2.0 - 1.0).reshape(shape)


def formula_tensor(name, shape):
    """Kiln's random weight `name`: variance 1/fan_in, norm scales 1 + 0.2u, biases 0.2u."""
    u = name_uniforms(name, shape)
    if len(shape) >= 2:
        u = u * math.sqrt(3.0 / int(np.prod(shape[1:])))
    elif name.endswith("weight"):
        u = 1.0 + 0.2 * u
    else:
        u = 0.2 * u
    return torch.from_numpy(u.astype(np.float32))


def make_latent_unet_reference():
    """latent-upscale/unet/: the published structure with formula weights and inputs (unit
    variance), and diffusers' output for them."""
    out_dir = os.path.join(LATENT_DIR, "unet")
    os.makedirs(out_dir)
    unet = UNet2DConditionModel(**LATENT_UNET_FULL)
    shapes = {name: list(t.shape) for name, t in unet.state_dict().items()}
    unet.load_state_dict({name: formula_tensor(name, shape) for name, shape in shapes.items()})
    sample, context, cond = (torch.from_numpy((name_uniforms(name, shape) * math.sqrt(3)).astype(np.float32))
                             for name, shape in LATENT_UNET_INPUTS.items())
    timestep = torch.log(torch.tensor(2.5)) * 0.25
    out = unet(sample, timestep, encoder_hidden_states=context, timestep_cond=cond).sample
    heads = [m.heads for n, m in unet.named_modules() if n.startswith("up_blocks.0.") and n.endswith("attn2")]
    assert heads == [8, 8], heads  # attention_head_dim[0] = 8 for 64 channels, not [3] = 32
    np.save(os.path.join(out_dir, "output.npy"), out.numpy())
    write_json(os.path.join(out_dir, "config.json"), {k: v for k, v in unet.config.items() if not k.startswith("_")})
    write_json(os.path.join(out_dir, "call.json"), dict(timestep=float(timestep), inputs=LATENT_UNET_INPUTS))
    print(f"  latent-upscale/unet: {len(shapes)} tensors, output std {out.std():.3f}")


def build_latent_upscaler(sd1):
    torch.manual_seed(LATENT_SEED)
    unet = UNet2DConditionModel(**LATENT_UNET)
    texture_init(unet, LATENT_SEED + 2, {"attn2.to_out": CROSS_ATTN_OUT_GAIN})
    ids = sd1.tokenizer("a photo of a cat", padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt").input_ids
    out = sd1.text_encoder(ids, output_hidden_states=True)
    cond = torch.cat([torch.ones(1, 64), torch.zeros(1, 64), out.pooler_output], dim=1)
    calibrate_unet(unet, None, None, LATENT_SEED + 4, encoder_hidden_states=out.hidden_states[-1], timestep_cond=cond)
    pipe = StableDiffusionLatentUpscalePipeline(
        vae=sd1.vae, text_encoder=sd1.text_encoder, tokenizer=sd1.tokenizer, unet=unet,
        scheduler=EulerDiscreteScheduler.from_config({k: v for k, v in LATENT_SCHEDULER.items() if k[0] != "_"}))
    out_dir = os.path.join(FIXTURES, "sd-x2-latent-upscaler-tiny")
    save_edit_pipeline(pipe, out_dir, (unet,), ("text_encoder", "tokenizer", "vae"), {"scheduler": LATENT_SCHEDULER})
    return out_dir


def make_latent_upscale():
    """sd-x2-latent-upscaler-tiny and its references in latent-upscale/."""
    torch.set_num_threads(1)
    sd1 = load_pipeline(os.path.join(FIXTURES, "sd1-tiny"), MODELS["sd1-tiny"])
    if os.path.isdir(LATENT_DIR):
        shutil.rmtree(LATENT_DIR)
    os.makedirs(LATENT_DIR)
    make_latent_unet_reference()
    out_dir = build_latent_upscaler(sd1)
    pipe = StableDiffusionLatentUpscalePipeline.from_pretrained(out_dir, variant="fp16", torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.interpolation_type == "log_linear" and pipe.unet.config.sample_size is None
    init = Image.open(os.path.join(EDIT_DIR, "init.png")).convert("RGB")
    index, rendered = [], []
    print("latent upscaler references:")
    for i, (name, steps, guidance, negative, source) in enumerate(LATENT_CASES):
        image, image_latents = init, None
        if source == "txt2img latents":
            noise = torch.from_numpy(np.random.RandomState(LATENT_SEED + 30).standard_normal((1, 4, 8, 8)).astype(np.float32))
            image = sd1(EDIT_PROMPT, num_inference_steps=3, guidance_scale=7.5, latents=noise, output_type="latent").images
            image_latents = f"{name}.image_latents.npy"
            np.save(os.path.join(LATENT_DIR, image_latents), image.numpy())
        with labelled_noise(LATENT_SEED + 20 + i) as draws:
            images = pipe(EDIT_PROMPT, image=image, num_inference_steps=steps, guidance_scale=guidance,
                          negative_prompt=negative, output_type="np").images
        # The pipeline samples the image's encoding (unless given latents), then draws the initial latents.
        roles = ["latents"] if image_latents else ["encode", "latents"]
        assert [r for r, _ in draws] == roles, [r for r, _ in draws]
        relabelled = [("low_res" if r == "encode" else r, a) for r, a in draws]
        files = save_draws(name, relabelled, ("low_res", "latents"), out_dir=LATENT_DIR)
        image = to_uint8(images)[0]
        assert image.shape == (128, 128, 3), image.shape
        Image.fromarray(image).save(os.path.join(LATENT_DIR, f"{name}.png"))
        rendered.append(image.astype(np.int32))
        flat = np.abs(rendered[-1] - rendered[-1].mean(axis=(0, 1))).mean()
        print(f"  {name:24s} |image - its mean colour| {flat:5.1f}/255")
        assert flat >= 10, "a flat image"
        # With latents, init.png (the same size) only sizes the input: the pipeline never sees it.
        index.append(dict(name=name, mode="upscale", model="sd-x2-latent-upscaler-tiny", scheduler=None,
                          strength=None, steps=steps, guidance=guidance, prompt=EDIT_PROMPT,
                          negative_prompt=negative, image_input="init.png", image_latents=image_latents,
                          image=f"{name}.png", noise=files))
    diff = np.abs(rendered[0] - rendered[1]).mean()
    print(f"  the two cases differ by a mean {diff:.1f}/255")
    assert diff >= 3
    write_json(os.path.join(LATENT_DIR, "editing.json"), index)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["prompts", "taesd", "lora", "lora-sdxl", "sdxl", "latent-upscale"],
                    help="remake one part (prompts, lora, lora-sdxl, sdxl: from the committed pipelines)")
    args = ap.parse_args()
    if args.only in ("lora", "lora-sdxl"):
        if args.only == "lora":
            make_lora()
        make_lora_sdxl()
        return
    if args.only == "sdxl":
        make_sdxl()
        return
    if args.only == "latent-upscale":
        make_latent_upscale()
        return
    if args.only == "prompts":
        make_prompts({name: load_pipeline(os.path.join(FIXTURES, name), spec) for name, spec in MODELS.items()})
        return
    if args.only == "taesd":
        make_taesd()
        return
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
          f"numpy {np.__version__}")
    os.makedirs(FIXTURES, exist_ok=True)

    encoder, merges = build_clip_vocab()
    tmp_tok = os.path.join(FIXTURES, ".tmp_tokenizer")
    write_tokenizer_dir(tmp_tok, encoder, merges, EOS)
    check_vocab(tmp_tok)

    pipes, ref_tokenizers = {}, {}
    for name, spec in MODELS.items():
        out_dir = os.path.join(FIXTURES, name)
        pipe = build_pipeline(name, spec, encoder, merges, tmp_tok)
        save_pipeline(pipe, out_dir, spec, encoder, merges)
        pipes[name] = load_pipeline(out_dir, spec)
        ref_tokenizers[name] = load_reference_tokenizer(os.path.join(out_dir, "tokenizer"))
        assert ref_tokenizers[name].pad_token_id == spec["pad_id"]
        check_vocab(os.path.join(out_dir, "tokenizer"))
        print(f"{name}: saved to {os.path.relpath(out_dir, REPO_ROOT)}")
        model_stats(pipes[name], name)
    shutil.rmtree(tmp_tok)

    make_images(pipes, ref_tokenizers)
    make_tokenizer_cases(ref_tokenizers)
    make_scheduler_arrays()
    make_add_noise_arrays()
    make_editing(pipes)
    make_prompts(pipes)
    make_taesd()
    make_lora()
    make_sdxl()
    make_lora_sdxl()
    make_latent_upscale()


if __name__ == "__main__":
    main()
