#!/usr/bin/env python
"""Train a toy world base model from scratch and save it in diffusers layout: SDXL's architecture (default) or SD3's.

    python -m toyworld.train_base --output_dir models/toy-sdxl --seed 0 [--device cuda]
    python -m toyworld.train_base --family sd3 --output_dir models/toy-sd3 --vae_from models/toy-sdxl --unet_steps 3000

models/toy-sd3-relations is models/toy-sd3 continued in two stages with `--relation_skew` (1.0, then 0.8) so that it
reads the relation words; its model card lists the commands (every continued model's card does).

The SDXL model loads with `sharpening.sdxl.load` and `StableDiffusionXLPipeline.from_pretrained` and is
what `make demo` and `benchmarks/quality.py` fine-tune. Recipe (all from `--seed`, deterministic on a
given device):

1. Text encoders: SDXL's pair (CLIPTextModel + CLIPTextModelWithProjection, hidden size 24 each) with the
   real CLIP BPE tokenizer, trained from scratch together with the UNet (step 3). An earlier recipe left them
   frozen at their random initialisation; that model ignored much of its caption (wrong colours and shapes
   on single objects: toy reward 0.23 on single-object prompts), which left reward fine-tuning nothing but
   noise to rank. `--no-train_text_encoders` still builds that variant.
2. VAE: AutoencoderKL with one downsampling (32x32x3 pixels <-> 16x16x4 latents), trained briefly on
   fresh world images (MSE + a tiny KL term). Its scaling_factor is set to 1/std of the latents, as for
   SD's VAEs, so noised latents have unit variance.
3. UNet: UNet2DConditionModel with SDXL's "text_time" added conditioning, trained (with the text encoders)
   with the epsilon objective on cached latents of a fixed set of world images (half single objects, half
   compositions of the TRAIN pairs), 10% caption dropout to zero embeddings (the pipeline's
   force_zeros_for_empty_prompt) for classifier-free guidance, AdamW + cosine schedule, EMA weights saved.
   The budget is deliberately short: single objects are learned well, compositions (binding colours to
   shapes, relations) only partly, which is the kind of flaw reward fine-tuning should fix.
4. Scheduler: SDXL's Euler config (scaled_linear 0.00085..0.012, leading spacing, steps_offset 1).

`--family sd3` builds the same world model with SD3's architecture (loads with `StableDiffusion3Pipeline`; the
flow-matching counterpart for `benchmarks/reward_response.py --model models/toy-sd3`):
- Text encoders: CLIP-L- and CLIP-G-style CLIPTextModelWithProjection (width 24 each, the real CLIP BPE vocabulary)
  and a small T5 encoder (width 48 = both CLIP widths, or SD3 would truncate them) with a small Unigram tokenizer
  trained offline (captions reach T5 as short pieces, mostly single letters: under 77 tokens each); all three trained
  with the transformer, T5 at `--max_sequence_length` tokens.
- VAE: `--vae_from` reuses a trained toy VAE (the SDXL toy's: same world, same 16x16x4 latents) with SD3's latent
  convention (z - shift_factor) * scaling_factor, both measured on the dataset (mean, 1/std); without it a VAE is
  trained as in step 2.
- Denoiser: SD3Transformer2DModel (MMDiT, patch 2, SD3.5's RMS qk-norm and one dual-attention block), rectified-flow
  objective as in SD3 (Esser et al. 2024, arXiv 2403.03206): x_t = (1 - σ) x0 + σ ε, target ε - x0, σ from a
  logit-normal(0, 1) density, timestep σ·1000; caption dropout encodes "" (SD3's negative prompt for guidance).
- Scheduler: FlowMatchEulerDiscreteScheduler with shift 1 (SD3 ships shift 3 for 1024 px; the shift grows with the
  image size, and 32 px images need none).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sharpening.tiny import CLIP_CONTEXT, CLIP_VOCAB_SIZE, write_clip_tokenizer  # noqa: E402
from toyworld import world  # noqa: E402

FAMILIES = ("sdxl", "sd3")
FORWARD_RELATIONS = ("to the left of", "above")  # the first-named object lies left of / above the second
FLOW_SHIFT = 1.0  # sd3: the scheduler's shift (see the docstring)
TEXT_WIDTH = 24  # per encoder (UNet context: 2 * 24 = 48 channels); keeps the model under 30 MB with the
# two 49408-token embedding tables of the real CLIP vocabulary


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=FAMILIES, default="sdxl", help="Architecture of the model (see above).")
    p.add_argument("--output_dir", default=None, help="Default: models/toy-<family>.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda; results are deterministic per device.")
    p.add_argument("--num_threads", type=int, default=1,
                   help="CPU threads. 1 by default: on a shared 2-core machine two spinning OpenMP threads ran 4x SLOWER than one (measured).")
    p.add_argument("--vae_from", default=None, help="A toy model folder whose vae/ is reused instead of training a VAE.")
    p.add_argument("--init_from", default=None,
                   help="Continue training a saved toy model of the same family (its denoiser, text encoders, tokenizers and VAE, "
                        "whose latent scale is kept) instead of building one from scratch; no VAE training. Training starts from "
                        "its saved (EMA) weights with a fresh optimiser and schedule. Use another --seed than the model's for fresh images.")
    p.add_argument("--vae_steps", type=int, default=600)
    p.add_argument("--vae_batch_size", type=int, default=16)
    p.add_argument("--vae_lr", type=float, default=2e-3)
    p.add_argument("--unet_steps", type=int, default=5000)
    p.add_argument("--unet_lr", type=float, default=1e-3)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--dataset_size", type=int, default=8192, help="World images whose latents the UNet trains on.")
    p.add_argument("--single_fraction", type=float, default=0.5, help="Share of single-object images (the rest: compositions).")
    p.add_argument("--placed_fraction", type=float, default=0.0,
                   help="Share of placed single objects ('a red circle on the left'; toyworld.world's curriculum captions), taken "
                        "from the compositions' share. A composition's relation asks the denoiser for a three-way interaction "
                        "(an image token's position, which object the caption names first, the relation word); a placed single "
                        "asks for the two-way half of it (position and place word). 0 (default) draws what it drew before.")
    p.add_argument("--relation_skew", type=float, default=None,
                   help="Share of compositions whose relation is 'to the left of' or 'above' (the first-named object on the "
                        "left / at the top); the rest use 'to the right of' / 'below'. Uniform relations (the default) give the "
                        "pair (word order, position) no signal of its own: each order puts the first object on either side "
                        "equally often, so only the three-way interaction with the relation word pays. A skew, e.g. 0.8, "
                        "makes 'the first-named object goes left / up' pay by itself, a step towards the relation.")
    p.add_argument("--train_text_encoders", action=argparse.BooleanOptionalAction, default=True,
                   help="Train both text encoders with the UNet (default). Frozen random encoders gave a model that ignored "
                        "much of its caption (wrong colours and shapes on single objects).")
    p.add_argument("--unet_levels", type=int, choices=(2, 3), default=2,
                   help="sdxl: resolution levels of the toy UNet (see build_unet). 2 is the shipped toy; 3 adds SDXL's third level, "
                        "with cross-attention at 4x4.")
    p.add_argument("--caption_dropout", type=float, default=0.1)
    p.add_argument("--loss_weighting", choices=("epsilon", "v"), default="epsilon",
                   help="sdxl: per-sample weight of the epsilon MSE. 'epsilon' weighs every timestep alike, which in x0 terms "
                        "weighs a timestep by its SNR: at t = 950 an x0 error counts 1/120 of its size, and the layout of a "
                        "composition is decided there. 'v' weighs by 1 / alpha_bar_t over its mean across timesteps (the "
                        "v-prediction loss of the same epsilon model, Salimans & Ho 2022, arXiv 2202.00512, at the plain loss's "
                        "overall scale), so high-noise x0 errors count.")
    p.add_argument("--logit_mean", type=float, default=0.0,
                   help="sd3: location of the logit-normal density of training sigmas (SD3's weighting, Esser et al. 2024). 0 puts "
                        "4 %% of draws above sigma 0.85, where a 32 px composition's layout is decided; 1 puts 23 %% there.")
    p.add_argument("--logit_std", type=float, default=1.0, help="sd3: scale of that logit-normal density.")
    p.add_argument("--ema_decay", type=float, default=0.999)
    p.add_argument("--max_sequence_length", type=int, default=77, help="sd3: T5 tokens per caption (the training scripts' default).")
    p.add_argument("--log_every", type=int, default=100)
    p.add_argument("--max_seconds", type=float, default=None,
                   help="Stop the denoiser's training after this many seconds from the start and save what it has (for a "
                        "machine lent for a fixed time); training_summary.json records the step it stopped at.")
    args = p.parse_args(argv)
    if args.loss_weighting != "epsilon" and args.family != "sdxl":
        p.error("--loss_weighting is for the epsilon objective (--family sdxl); sd3 trains the velocity loss.")
    if args.unet_levels != 2 and (args.family != "sdxl" or args.init_from):
        p.error("--unet_levels shapes a new sdxl UNet; sd3 builds a transformer and --init_from keeps the saved UNet's shape.")
    if (args.logit_mean, args.logit_std) != (0.0, 1.0) and args.family != "sd3":
        p.error("--logit_mean/--logit_std shape sd3's sigma density; sdxl draws timesteps uniformly (see --loss_weighting).")
    if min(args.single_fraction, args.placed_fraction) < 0 or args.single_fraction + args.placed_fraction > 1:
        p.error("--single_fraction and --placed_fraction are shares of the dataset: each >= 0, together <= 1.")
    if args.relation_skew is not None and not 0 <= args.relation_skew <= 1:
        p.error("--relation_skew is a share of the compositions: between 0 and 1.")
    if args.init_from and args.vae_from:
        p.error("--init_from continues a model with its own VAE; drop --vae_from.")
    args.output_dir = args.output_dir or str(ROOT / "models" / f"toy-{args.family}")
    return args


# --------------------------------------------------------------------------------------------- models
def clip_config():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=CLIP_VOCAB_SIZE - 2, eos_token_id=CLIP_VOCAB_SIZE - 1, pad_token_id=CLIP_VOCAB_SIZE - 1,
        hidden_size=TEXT_WIDTH, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3,
        vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=CLIP_CONTEXT, hidden_act="gelu", projection_dim=TEXT_WIDTH,
    )


def build_text_encoders(seed: int):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    config = clip_config()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(config)
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(config)
    return text_encoder.eval().requires_grad_(False), text_encoder_2.eval().requires_grad_(False)


def build_sd3_text(seed: int, build_dir: Path, placed: bool = False):
    """(tokenizers, encoders) of the SD3 toy: CLIP-L-, CLIP-G-style encoders with projection and a small T5 with an
    offline Unigram tokenizer (written under `build_dir`)."""
    from transformers import CLIPTextModelWithProjection

    from sharpening.tiny import tokenizers_and_t5

    config = clip_config()
    torch.manual_seed(seed + 2)
    clip_l = CLIPTextModelWithProjection(config)
    torch.manual_seed(seed + 3)
    clip_g = CLIPTextModelWithProjection(config)
    corpus = tuple(world.train_prompts("all") + world.heldout_prompts() + (world.train_prompts("placed") if placed else []))  # text only
    clip_tokenizer, t5_tokenizer, t5 = tokenizers_and_t5(build_dir, 2 * TEXT_WIDTH, seed + 5, corpus, t5_max_length=77)
    encoders = tuple(e.eval().requires_grad_(False) for e in (clip_l, clip_g, t5))
    return (clip_tokenizer, clip_tokenizer, t5_tokenizer), encoders


def build_vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed + 1)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=world.IMAGE_SIZE,
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )


def build_unet(seed: int, levels: int = 2):
    """SDXL's UNet at toy size. levels=2 (the shipped toy): 16x16 and 8x8, cross-attention at 8x8 only. levels=3 adds SDXL's
    third level (4x4; SDXL itself has three), so cross-attention also runs where the zero padding of every 3x3 convolution
    tells each position where it is: attention in diffusers' UNet has no positional embedding, the convolutions' padding is
    the UNet's only source of absolute position, and at 8x8 most positions are more than one cell from a border."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed + 4)
    shape = {
        2: dict(block_out_channels=(48, 96), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(4, 8), transformer_layers_per_block=(1, 1)),
        3: dict(block_out_channels=(48, 96, 96), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(4, 8, 8),
                transformer_layers_per_block=(1, 1, 1)),
    }[levels]
    return UNet2DConditionModel(
        sample_size=world.IMAGE_SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8,
        use_linear_projection=True, cross_attention_dim=2 * TEXT_WIDTH,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + TEXT_WIDTH,  # 6 time ids x 8 + pooled text_encoder_2
        **shape,
    )


def build_transformer(seed: int):
    """SD3's MMDiT at toy size: 16x16x4 latents in 2x2 patches (64 image tokens), width 64, six joint blocks."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed + 4)
    return SD3Transformer2DModel(
        sample_size=world.IMAGE_SIZE // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=6, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=2 * TEXT_WIDTH, caption_projection_dim=64, pooled_projection_dim=2 * TEXT_WIDTH,
        pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
    )


def build_flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=FLOW_SHIFT)


def build_scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1,
        prediction_type="epsilon", num_train_timesteps=1000,
    )


# --------------------------------------------------------------------------------------------- data
def to_pixels(images) -> torch.Tensor:
    """PIL images -> (N, 3, H, W) in [-1, 1]."""
    arrays = np.stack([np.asarray(i, dtype=np.float32) for i in images]) / 127.5 - 1.0
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()


def world_images(count: int, seed: int, single_fraction: float, placed_fraction: float = 0.0,
                 relation_skew: float | None = None) -> list[tuple]:
    n_single, n_placed = round(count * single_fraction), round(count * placed_fraction)
    n_pairs = count - n_single - n_placed
    items = world.generate(world.train_prompts("single"), n_single, seed)
    pairs = world.train_prompts("pairs")
    if relation_skew is None:
        items += world.generate(pairs, n_pairs, seed + 1)
    else:  # a share `relation_skew` names the left / upper object first; the rest use the mirrored relations
        forward, mirrored = [], []
        for caption in pairs:
            (forward if world.parse_caption(caption).relation in FORWARD_RELATIONS else mirrored).append(caption)
        n_forward = round(n_pairs * relation_skew)
        items += world.generate(forward, n_forward, seed + 1) + world.generate(mirrored, n_pairs - n_forward, seed + 4)
    if n_placed:
        items += world.generate(world.train_prompts("placed"), n_placed, seed + 3)
    order = np.random.default_rng(seed + 2).permutation(len(items))
    return [items[i] for i in order]


# --------------------------------------------------------------------------------------------- stages
def train_vae(vae, args, device) -> float:
    """Reconstruction on fresh world images; returns the last logged loss."""
    vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 10)
    loss_value = float("nan")
    for step in range(args.vae_steps):
        images = world_images(args.vae_batch_size, args.seed * 1_000_003 + 7919 * step, args.single_fraction, args.placed_fraction,
                              args.relation_skew)
        pixels = to_pixels([i for i, _ in images]).to(device)
        dist = vae.encode(pixels).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen).to(device)
        recon = vae.decode(z).sample
        kl = 0.5 * (dist.mean**2 + dist.var - 1 - dist.logvar).mean()
        loss = F.mse_loss(recon, pixels) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for group in opt.param_groups:  # cosine decay: the last steps polish edges
            group["lr"] = args.vae_lr * 0.5 * (1 + math.cos(math.pi * (step + 1) / args.vae_steps))
        if step % args.log_every == 0 or step == args.vae_steps - 1:
            loss_value = float(loss.detach())
            print(f"vae step {step:5d} loss {loss_value:.5f} kl {float(kl.detach()):.3f} [{time.time() - args.started:.0f} s]", flush=True)
    return loss_value


@torch.no_grad()
def encode_dataset(vae, images, device, batch=256):
    vae.eval()
    means, stds = [], []
    for start in range(0, len(images), batch):
        dist = vae.encode(to_pixels(images[start : start + batch]).to(device)).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    return torch.cat(means), torch.cat(stds)


def noised(family: str, x0: torch.Tensor, noise: torch.Tensor, gen: torch.Generator, abar: torch.Tensor, weighting: str = "epsilon",
           logit_mean: float = 0.0, logit_std: float = 1.0):
    """(x_t, timestep, regression target, per-sample loss weight) of the family's training objective: epsilon
    prediction on SDXL's discrete schedule (weighted as `--loss_weighting` says), or the rectified-flow velocity
    ε - x0 at σ ~ logit-normal(logit_mean, logit_std) (SD3) with timestep σ·1000."""
    n = x0.shape[0]
    if family == "sdxl":
        t = torch.randint(0, 1000, (n,), generator=gen).to(x0.device)
        a = abar[t].view(-1, 1, 1, 1)
        weight = (1 / a.view(-1)) / (1 / abar).mean() if weighting == "v" else torch.ones_like(t, dtype=x0.dtype)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise, t, noise, weight
    sigma = torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=gen)).to(x0.device)
    s = sigma.view(-1, 1, 1, 1)
    return (1 - s) * x0 + s * noise, sigma * 1000, noise - x0, torch.ones(n, device=x0.device)


def train_denoiser(family, denoiser, text_encoders, latents, caption_index, caption_ids, args, device):
    """The denoising objective (`noised`) on the cached latents (`latents`: VAE posterior means and stds; x0 =
    (z - args.shift_factor) * args.scaling_factor), the denoiser and (with --train_text_encoders) the text encoders trained
    together; returns EMA copies of the trained weights and the loss log. `caption_ids` holds one token-id tensor
    per tokenizer, its last row the empty caption "" (SD3's dropped-caption conditioning; SDXL's dropped captions
    are zero embeddings instead, the pipeline's force_zeros_for_empty_prompt)."""
    import copy

    from diffusers import DDPMScheduler

    from sharpening import sd3, sdxl

    latents_mean, latents_std = latents
    abar = DDPMScheduler.from_config(build_scheduler().config).alphas_cumprod.to(device)
    modules = [denoiser.to(device).train()]
    for encoder in text_encoders:
        encoder.to(device)
        if args.train_text_encoders:
            modules.append(encoder.train().requires_grad_(True))
    params = [p for m in modules for p in m.parameters()]
    emas = [copy.deepcopy(m).requires_grad_(False) for m in modules]
    ema_params = [p for m in emas for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=0.0)
    warmup = max(1, min(200, args.unet_steps // 10))
    gen = torch.Generator().manual_seed(args.seed + 20)
    size = world.IMAGE_SIZE
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32, device=device)
    caption_ids = [ids.to(device) for ids in caption_ids]
    empty_row = len(caption_ids[0]) - 1

    def encode_rows(rows: torch.Tensor):
        ids = [i[rows] for i in caption_ids]
        if family == "sdxl":
            embeds, pooled = sdxl.encode_token_ids(text_encoders, ids)
            return sdxl.Conditioning(embeds, pooled, time_ids.expand(len(rows), -1))
        return sd3.Conditioning(*sd3.encode_token_ids(text_encoders, ids))

    encode = encode_rows
    if not args.train_text_encoders:  # frozen: embed each caption once
        with torch.no_grad():
            encode = encode_rows(torch.arange(len(caption_ids[0]), device=device)).select
    forward = (sdxl if family == "sdxl" else sd3).forward(denoiser)
    log, window = [], []
    for step in range(args.unet_steps):
        idx = torch.randint(0, len(latents_mean), (args.batch_size,), generator=gen)
        eps_vae = torch.randn(latents_mean[idx].shape, generator=gen)
        x0 = ((latents_mean[idx] + latents_std[idx] * eps_vae - args.shift_factor) * args.scaling_factor).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        x_t, t, target, weight = noised(family, x0, noise, gen, abar, args.loss_weighting, args.logit_mean, args.logit_std)
        keep = (torch.rand(args.batch_size, generator=gen) >= args.caption_dropout).to(device)
        rows = caption_index[idx].to(device)
        if family == "sdxl":  # dropped captions -> zero embeddings (force_zeros_for_empty_prompt)
            cond = encode(rows)
            cond = sdxl.Conditioning(cond.prompt_embeds * keep.view(-1, 1, 1), cond.pooled * keep.view(-1, 1), cond.time_ids)
        else:  # dropped captions -> the encoded empty prompt
            cond = encode(torch.where(keep, rows, empty_row))
        loss = (weight * ((forward(x_t, t, cond) - target) ** 2).mean((1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        lr = args.unet_lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / args.unet_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        with torch.no_grad():
            decay = min(args.ema_decay, (1 + step) / (10 + step))  # warm-up of the EMA, as diffusers' EMAModel
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        window.append(float(loss.detach()))
        out_of_time = args.max_seconds is not None and time.time() - args.started > args.max_seconds
        if (step + 1) % args.log_every == 0 or step == args.unet_steps - 1 or out_of_time:
            log.append({"step": step + 1, "loss": float(np.mean(window)), "lr": lr})
            print(f"{family} denoiser step {step + 1:5d} loss {np.mean(window):.4f} lr {lr:.2e} [{time.time() - args.started:.0f} s]", flush=True)
            window = []
        if out_of_time:
            print(f"--max_seconds {args.max_seconds} reached: stopping at step {step + 1} of {args.unet_steps} (the schedule did not "
                  "finish; the summary says so)", flush=True)
            break
    ema_denoiser = emas[0].eval()
    ema_encoders = tuple(e.eval() for e in emas[1:]) if args.train_text_encoders else text_encoders
    return ema_denoiser, ema_encoders, log


CARDS = {
    "sdxl": ("stable-diffusion-xl", "an SDXL-architecture model", "StableDiffusionXLPipeline",
             'SDXL\'s architecture (UNet with "text_time" added conditioning, AutoencoderKL, CLIPTextModel +\n'
             "CLIPTextModelWithProjection, the real CLIP BPE tokenizer)",
             "`make demo` and `benchmarks/quality.py` can show reward fine-tuning on a CPU"),
    "sd3": ("stable-diffusion-3", "an SD3-architecture (flow-matching) model", "StableDiffusion3Pipeline",
            "SD3's architecture (SD3Transformer2DModel with RMS qk-norm and a dual-attention block, rectified-flow\n"
            "objective, FlowMatchEulerDiscreteScheduler, two CLIPTextModelWithProjection with the real CLIP BPE tokenizer and\n"
            "a small T5 encoder; the VAE of the SDXL toy with SD3's shift and scale)",
            "`benchmarks/reward_response.py --model {path}` can show reward fine-tuning of a flow model on a CPU"),
}
_RUN_FLAGS = ("output_dir", "seed", "device", "num_threads")  # written last (or from the folder), in a fixed order


def repo_path(folder) -> str:
    """A folder as a command should name it: relative to the repository when inside it."""
    folder = Path(folder).resolve()
    return str(folder.relative_to(ROOT)) if folder.is_relative_to(ROOT) else str(folder)


def stage_command(flags: dict, output_dir: str) -> str:
    """The train_base command that repeats one recorded run (its non-default flags) into `output_dir`. A recorded flag
    that train_base no longer has is written all the same, so that rerunning the command fails instead of silently
    training something else."""
    defaults = vars(parse_args([]))
    changed = []
    for name, value in flags.items():
        if name in _RUN_FLAGS or (name in defaults and value == defaults[name]):
            continue
        if isinstance(value, bool):  # BooleanOptionalAction flags
            changed.append(f"--{name}" if value else f"--no-{name}")
        else:
            changed.append(f"--{name} {value}")
    return " ".join(["python -m toyworld.train_base", f"--output_dir {output_dir}", *changed,
                     f"--seed {flags['seed']} --device {flags['device']} --num_threads {flags['num_threads']}"])


def training_stages(out: Path, summary: dict) -> list[tuple[dict, str]]:
    """(summary, output folder) of every run that made the model at `out`, first to last: it and the runs it continued
    (`--init_from`, read from their training_summary.json), back to a model that ships in models/ (whose own card
    reproduces it) or to a folder whose summary is gone (its stage's --init_from then names what is missing)."""
    stages = [(summary, repo_path(out))]
    while (init := stages[0][0]["flags"].get("init_from")) and not Path(init).resolve().is_relative_to(ROOT / "models"):
        summary_file = Path(init) / "training_summary.json"
        if not summary_file.is_file():
            break
        stages.insert(0, (json.loads(summary_file.read_text()), repo_path(init)))
    return stages


def write_model_card(out: Path, summary: dict, family: str) -> None:
    tag, what, pipeline, architecture, purpose = CARDS[family]
    path = repo_path(out)
    size_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
    params = ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in summary["parameters"].items())
    stages = training_stages(out, summary)
    commands = "\n".join(stage_command(s["flags"], folder) for s, folder in stages)
    if summary["flags"].get("init_from"):
        origin = stages[0][0]["flags"].get("init_from")
        history = (f"It was trained in {len(stages)} stages{f', starting from `{origin}`' if origin else ''}: the commands "
                   "below, in order, each continuing the one before with `--init_from`. What it reads from its captions: "
                   f"`python benchmarks/caption_sensitivity.py --model {path}`.")
    else:
        history = "It draws single objects reasonably and binds colours, shapes and relations in compositions only partly."
    seconds = sum(s["seconds"] for s, _ in stages)
    (out / "README.md").write_text(f"""---
library_name: diffusers
tags: [{tag}, toy, diffusion-sharpening]
---
# {out.name}: {what} of the toy shapes world

A small model with {architecture} trained on `toyworld.world` images
(32x32 px: coloured circles, squares and triangles, single or in pairs with a spatial relation). It exists so
that {purpose.format(path=path)}. {history}

- Parameters: {params}; {size_mb:.1f} MB on disk.
- Trained in {seconds:.0f} s on {summary['device']} ({f"{len(stages)} stages, seeds" if len(stages) > 1 else "seed"} {', '.join(str(s['seed']) for s, _ in stages)}); final denoiser loss {summary['unet_loss'][-1]['loss']:.4f}.
- Reproduce (see train_base's docstring for the recipe and `training_summary.json` for every flag):

```bash
{commands}
```

```python
from diffusers import {pipeline}
pipe = {pipeline}.from_pretrained("{path}")
image = pipe("a red circle to the left of a blue square", height=32, width=32, guidance_scale=5.0).images[0]
```
""")


def load_or_train_vae(args, device):
    """(VAE, its last training loss or None, seconds): `--vae_from`'s trained toy VAE, or one trained here."""
    started = time.time()
    if args.vae_from:
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(args.vae_from, subfolder="vae").to(device), None, 0.0
    vae = build_vae(args.seed)
    loss = train_vae(vae, args, device)
    return vae, loss, time.time() - started


def load_toy(folder: str, family: str):
    """(tokenizers, text encoders, VAE, denoiser) of a saved toy model of `family`, for `--init_from`."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline

    from sharpening.families import FAMILIES

    pipeline = json.loads((Path(folder) / "model_index.json").read_text()).get("_class_name")
    if FAMILIES.get(pipeline) != family:
        raise SystemExit(f"--init_from {folder} holds a {pipeline}, not a model of the family --family {family} trains.")
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline.from_pretrained(folder)
        return (pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2), pipe.vae, pipe.unet
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    return ((pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3), (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3),
            pipe.vae, pipe.transformer)


def main(args: argparse.Namespace) -> Path:
    from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    from sharpening import sd3

    started = args.started = time.time()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if device.type == "cuda":  # cuBLAS is deterministic only with a fixed workspace (set before its first call)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_dir = out / "_tokenizer_build"
    if args.init_from:
        tokenizers, text_encoders, vae, denoiser = load_toy(args.init_from, args.family)
        vae = vae.to(device)
        tokenizer, vae_loss, t_vae = tokenizers[0], None, 0.0
    elif args.family == "sdxl":
        tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(build_dir))
        tokenizers, text_encoders = (tokenizer, tokenizer), build_text_encoders(args.seed)
    else:
        tokenizers, text_encoders = build_sd3_text(args.seed, build_dir, placed=args.placed_fraction > 0)
    if not args.init_from:
        vae, vae_loss, t_vae = load_or_train_vae(args, device)
        denoiser = build_unet(args.seed, args.unet_levels) if args.family == "sdxl" else build_transformer(args.seed)

    images = world_images(args.dataset_size, args.seed + 100, args.single_fraction, args.placed_fraction, args.relation_skew)
    captions = sorted({c for _, c in images})
    caption_index = torch.tensor([captions.index(c) for _, c in images])
    means, stds = encode_dataset(vae, [i for i, _ in images], device)
    if args.init_from:  # the denoiser was trained on these latents: keep their scale
        args.shift_factor = float(vae.config.shift_factor or 0.0) if args.family == "sd3" else 0.0
        args.scaling_factor = float(vae.config.scaling_factor)
    else:  # SD convention: unit-variance latents; SD3 also centres them (z - shift_factor)
        args.shift_factor = float(means.mean()) if args.family == "sd3" else 0.0
        args.scaling_factor = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=args.scaling_factor, **({"shift_factor": args.shift_factor} if args.family == "sd3" else {}))
    if args.family == "sdxl":
        caption_ids = [tokenizer(captions + [""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                                 return_tensors="pt").input_ids] * 2
    else:
        caption_ids = list(sd3.tokenize(tokenizers, captions + [""], args.max_sequence_length))
    print(f"dataset: {len(images)} images, {len(captions)} captions, latent shift {args.shift_factor:.4f} scale {args.scaling_factor:.4f} "
          f"[{time.time() - started:.0f} s]", flush=True)

    ema, text_encoders, log = train_denoiser(args.family, denoiser, text_encoders, (means, stds), caption_index, caption_ids, args, device)

    vae, ema, text_encoders = vae.cpu().eval(), ema.cpu().eval(), tuple(e.cpu() for e in text_encoders)
    if args.family == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1], tokenizer=tokenizer, tokenizer_2=tokenizer,
            unet=ema, scheduler=build_scheduler(), force_zeros_for_empty_prompt=True,
        )
    else:
        pipe = StableDiffusion3Pipeline(
            transformer=ema, scheduler=build_flow_scheduler(), vae=vae, text_encoder=text_encoders[0], tokenizer=tokenizers[0],
            text_encoder_2=text_encoders[1], tokenizer_2=tokenizers[1], text_encoder_3=text_encoders[2], tokenizer_3=tokenizers[2],
        )
    pipe.save_pretrained(out, safe_serialization=True)
    shutil.rmtree(build_dir, ignore_errors=True)
    names = ("unet", "text_encoder", "text_encoder_2") if args.family == "sdxl" else ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
    summary = {
        "family": args.family, "seed": args.seed, "device": str(device), "seconds": round(time.time() - started, 1), "vae_seconds": round(t_vae, 1),
        "vae_final_loss": vae_loss, "unet_loss": log, "unet_steps_done": log[-1]["step"] if log else 0, "shift_factor": args.shift_factor, "scaling_factor": args.scaling_factor,
        "flags": {k: v for k, v in vars(args).items() if k not in ("shift_factor", "scaling_factor", "started")},
        "parameters": {name: sum(p.numel() for p in m.parameters()) for name, m in zip(names + ("vae",), (ema, *text_encoders, vae))},
    }
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2))
    write_model_card(out, summary, args.family)
    print(f"saved {out} in {summary['seconds']:.0f} s", flush=True)
    return out


if __name__ == "__main__":
    main(parse_args())
