#!/usr/bin/env python
"""Train the toy world's SDXL-architecture base model from scratch and save it in diffusers layout.

    python -m toyworld.train_base --output_dir models/toy-sdxl --seed 0 [--device cuda]

The result loads with `sharpening.sdxl.load` and `StableDiffusionXLPipeline.from_pretrained` and is
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
"""
from __future__ import annotations

import argparse
import json
import math
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

from sharpening.sdxl import encode_token_ids  # noqa: E402
from sharpening.tiny import CLIP_CONTEXT, CLIP_VOCAB_SIZE, write_clip_tokenizer  # noqa: E402
from toyworld import world  # noqa: E402

TEXT_WIDTH = 24  # per encoder (UNet context: 2 * 24 = 48 channels); keeps the model under 30 MB with the
# two 49408-token embedding tables of the real CLIP vocabulary


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default=str(ROOT / "models" / "toy-sdxl"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda; results are deterministic per device.")
    p.add_argument("--num_threads", type=int, default=1,
                   help="CPU threads. 1 by default: on a shared 2-core machine two spinning OpenMP threads ran 4x SLOWER than one (measured).")
    p.add_argument("--vae_steps", type=int, default=600)
    p.add_argument("--vae_batch_size", type=int, default=16)
    p.add_argument("--vae_lr", type=float, default=2e-3)
    p.add_argument("--unet_steps", type=int, default=5000)
    p.add_argument("--unet_lr", type=float, default=1e-3)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--dataset_size", type=int, default=8192, help="World images whose latents the UNet trains on.")
    p.add_argument("--single_fraction", type=float, default=0.5, help="Share of single-object images (the rest: compositions).")
    p.add_argument("--train_text_encoders", action=argparse.BooleanOptionalAction, default=True,
                   help="Train both text encoders with the UNet (default). Frozen random encoders gave a model that ignored "
                        "much of its caption (wrong colours and shapes on single objects).")
    p.add_argument("--caption_dropout", type=float, default=0.1)
    p.add_argument("--ema_decay", type=float, default=0.999)
    p.add_argument("--log_every", type=int, default=100)
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------- models
def build_text_encoders(seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        bos_token_id=CLIP_VOCAB_SIZE - 2, eos_token_id=CLIP_VOCAB_SIZE - 1, pad_token_id=CLIP_VOCAB_SIZE - 1,
        hidden_size=TEXT_WIDTH, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3,
        vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=CLIP_CONTEXT, hidden_act="gelu", projection_dim=TEXT_WIDTH,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(config)
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(config)
    return text_encoder.eval().requires_grad_(False), text_encoder_2.eval().requires_grad_(False)


def build_vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed + 1)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=world.IMAGE_SIZE,
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )


def build_unet(seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed + 4)
    return UNet2DConditionModel(
        sample_size=world.IMAGE_SIZE // 2, in_channels=4, out_channels=4,
        block_out_channels=(48, 96), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(4, 8), transformer_layers_per_block=(1, 1), use_linear_projection=True,
        cross_attention_dim=2 * TEXT_WIDTH,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + TEXT_WIDTH,  # 6 time ids x 8 + pooled text_encoder_2
    )


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


def world_images(count: int, seed: int, single_fraction: float) -> list[tuple]:
    n_single = round(count * single_fraction)
    items = world.generate(world.train_prompts("single"), n_single, seed) + world.generate(world.train_prompts("pairs"), count - n_single, seed + 1)
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
        images = world_images(args.vae_batch_size, args.seed * 1_000_003 + 7919 * step, args.single_fraction)
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


def train_denoiser(unet, text_encoders, latents_mean, latents_std, caption_index, caption_ids, args, device):
    """Epsilon objective on the cached latents, the UNet and (with --train_text_encoders) both text encoders
    trained together; returns EMA copies of the trained weights and the loss log."""
    import copy

    from diffusers import DDPMScheduler

    noise_schedule = DDPMScheduler.from_config(build_scheduler().config)
    abar = noise_schedule.alphas_cumprod.to(device)
    modules = [unet.to(device).train()]
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
    caption_ids = caption_ids.to(device)
    if not args.train_text_encoders:  # frozen: embed each caption once
        with torch.no_grad():
            frozen = encode_token_ids(text_encoders, (caption_ids, caption_ids))
    log, window = [], []
    for step in range(args.unet_steps):
        idx = torch.randint(0, len(latents_mean), (args.batch_size,), generator=gen)
        eps_vae = torch.randn(latents_mean[idx].shape, generator=gen)
        x0 = ((latents_mean[idx] + latents_std[idx] * eps_vae) * args.scaling_factor).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, 1000, (args.batch_size,), generator=gen).to(device)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        keep = (torch.rand(args.batch_size, generator=gen) >= args.caption_dropout).float().to(device)
        cap = caption_index[idx].to(device)
        if args.train_text_encoders:
            embeds, pooled = encode_token_ids(text_encoders, (caption_ids[cap],) * 2)
        else:
            embeds, pooled = frozen[0][cap], frozen[1][cap]
        cond = embeds * keep.view(-1, 1, 1)  # dropped captions -> zeros (force_zeros_for_empty_prompt)
        cond_pooled = pooled * keep.view(-1, 1)
        pred = unet(x_t, t, encoder_hidden_states=cond, added_cond_kwargs={"text_embeds": cond_pooled, "time_ids": time_ids.expand(args.batch_size, -1)}).sample
        loss = F.mse_loss(pred, noise)
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
        if (step + 1) % args.log_every == 0 or step == args.unet_steps - 1:
            log.append({"step": step + 1, "loss": float(np.mean(window)), "lr": lr})
            print(f"unet step {step + 1:5d} loss {np.mean(window):.4f} lr {lr:.2e} [{time.time() - args.started:.0f} s]", flush=True)
            window = []
    ema_unet = emas[0].eval()
    ema_encoders = tuple(e.eval() for e in emas[1:]) if args.train_text_encoders else text_encoders
    return ema_unet, ema_encoders, log


def write_model_card(out: Path, summary: dict) -> None:
    size_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
    params = ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in summary["parameters"].items())
    (out / "README.md").write_text(f"""---
library_name: diffusers
tags: [stable-diffusion-xl, toy, diffusion-sharpening]
---
# toy-sdxl: an SDXL-architecture model of the toy shapes world

A small model with SDXL's architecture (UNet with "text_time" added conditioning, AutoencoderKL, CLIPTextModel +
CLIPTextModelWithProjection, the real CLIP BPE tokenizer) trained from scratch on `toyworld.world` images
(32x32 px: coloured circles, squares and triangles, single or in pairs with a spatial relation). It exists so
that `make demo` and `benchmarks/quality.py` can show reward fine-tuning on a CPU. It draws single objects
reasonably and binds colours, shapes and relations in compositions only partly.

- Parameters: {params}; {size_mb:.1f} MB on disk.
- Trained in {summary['seconds']:.0f} s on {summary['device']} (seed {summary['seed']}); final UNet loss {summary['unet_loss'][-1]['loss']:.4f}.
- Reproduce: `python -m toyworld.train_base --output_dir models/toy-sdxl --seed {summary['seed']} --device {summary['device']} --num_threads {summary['flags']['num_threads']}` (see its docstring
  for the recipe and `training_summary.json` for every flag).

```python
from diffusers import StableDiffusionXLPipeline
pipe = StableDiffusionXLPipeline.from_pretrained("models/toy-sdxl")
image = pipe("a red circle to the left of a blue square", height=32, width=32, guidance_scale=5.0).images[0]
```
""")


def main(args: argparse.Namespace) -> Path:
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    started = args.started = time.time()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = write_clip_tokenizer(out / "_tokenizer_build")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    text_encoders = build_text_encoders(args.seed)

    vae = build_vae(args.seed)
    vae_loss = train_vae(vae, args, device)
    t_vae = time.time() - started

    images = world_images(args.dataset_size, args.seed + 100, args.single_fraction)
    captions = sorted({c for _, c in images})
    caption_index = torch.tensor([captions.index(c) for _, c in images])
    means, stds = encode_dataset(vae, [i for i, _ in images], device)
    args.scaling_factor = float(1.0 / means.std())  # SD convention: unit-variance latents
    vae.register_to_config(scaling_factor=args.scaling_factor)
    caption_ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    print(f"dataset: {len(images)} images, {len(captions)} captions, latent scaling_factor {args.scaling_factor:.4f} [{time.time() - started:.0f} s]", flush=True)

    unet = build_unet(args.seed)
    ema, text_encoders, log = train_denoiser(unet, text_encoders, means, stds, caption_index, caption_ids, args, device)

    pipe = StableDiffusionXLPipeline(
        vae=vae.cpu().eval(), text_encoder=text_encoders[0].cpu(), text_encoder_2=text_encoders[1].cpu(),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=ema.cpu().eval(), scheduler=build_scheduler(),
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    shutil.rmtree(tok_dir)
    summary = {
        "seed": args.seed, "device": str(device), "seconds": round(time.time() - started, 1), "vae_seconds": round(t_vae, 1),
        "vae_final_loss": vae_loss, "unet_loss": log, "scaling_factor": args.scaling_factor,
        "flags": {k: v for k, v in vars(args).items() if k not in ("scaling_factor", "started")},
        "parameters": {name: sum(p.numel() for p in m.parameters()) for name, m in
                       [("unet", ema), ("vae", vae), ("text_encoder", text_encoders[0]), ("text_encoder_2", text_encoders[1])]},
    }
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2))
    write_model_card(out, summary)
    print(f"saved {out} in {summary['seconds']:.0f} s", flush=True)
    return out


if __name__ == "__main__":
    main(parse_args())
