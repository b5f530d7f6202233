#!/usr/bin/env python
"""Where FLUX training goes wrong on CUDA: one training step of a FLUX transformer, set up as the trainers set it up
(LoRA: frozen bf16 base, fp32 adapters; full: fp32 weights; both under bf16 autocast, `sharpening.flux.forward`),
with PyTorch's SDPA free to pick cuDNN's attention ("cudnn on", torch's default) or not ("off", the trainers'
default, see --cudnn_attention), with and without gradient checkpointing; `--norm fp32` also swaps FluxAttention's
torch.nn.RMSNorm (fused kernel) for a float32 one, to rule it out. Prints, per setting: the loss, whether the output
and the gradients are finite, the output's largest difference from the same weights in fp32 without autocast, and
the peak CUDA memory.

    python scripts/flux_cuda_probe.py --model TINY_FLUX_DIR                 # the tiny twin (sharpening.tiny --flux)
    python scripts/flux_cuda_probe.py --real --cudnn on --checkpointing     # FLUX.1-dev's config, random weights

A setting that crashes the CUDA context (an illegal memory access) ends the process, so `--real` runs one setting per
call (scripts/gpu_checks.sh calls it once per setting, with CUDA_LAUNCH_BLOCKING=1 so the failing kernel is named).
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sharpening import flux  # noqa: E402
from sharpening.tiny import FLUX_DEV_TRANSFORMER  # noqa: E402


class Fp32RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm computed in float32 as diffusers' own RMSNorm (the one SD3's qk-norm uses)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + (self.eps if self.eps is not None else torch.finfo(x.dtype).eps))
        return (x * self.weight.float() if self.weight is not None else x).to(hidden_states.dtype)


def set_norm(transformer, norm: str):
    for module in transformer.modules():
        if isinstance(module, torch.nn.RMSNorm):
            module.__class__ = Fp32RMSNorm if norm == "fp32" else torch.nn.RMSNorm
    return transformer


def set_cudnn(cudnn: str):
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(cudnn == "on")


def prepare(transformer, kind: str, device):
    if kind == "lora":
        from peft import LoraConfig

        transformer.requires_grad_(False).to(device, dtype=torch.bfloat16)
        transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=flux.LORA_TARGET_MODULES))
        for p in transformer.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    else:
        transformer.requires_grad_(True).to(device, dtype=torch.float32)
    return transformer


def inputs(config, latent_side: int, tokens: int, batch: int, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    channels = config.in_channels // 4
    x = torch.randn(batch, channels, latent_side, latent_side, generator=gen)
    target = torch.randn(x.shape, generator=gen)
    cond = flux.Conditioning(torch.randn(batch, tokens, config.joint_attention_dim, generator=gen),
                             torch.randn(batch, config.pooled_projection_dim, generator=gen), torch.full((batch,), 3.5))
    t = torch.linspace(900.0, 300.0, batch)
    return x.to(device), t.to(device), cond.to(device=device), target.to(device)


def step(transformer, x, t, cond, target, autocast: bool):
    call = flux.forward(transformer)
    transformer.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = call(x, t, cond)
        loss = ((out.float() - target) ** 2).mean()
    loss.backward()
    grads = [p.grad for p in transformer.parameters() if p.requires_grad]
    grads_finite = all(g is not None and torch.isfinite(g).all() for g in grads)
    return out.detach().float(), float(loss.detach()), grads_finite


def peak_gib() -> str:
    return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if torch.cuda.is_available() else "-"


def reset_peak_memory():
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def report(label, out, loss, grads_finite, reference=None):
    diff = f"{(out - reference).abs().max().item():.3g}" if reference is not None else "-"
    print(f"{label:40s} loss {loss:12.5g}  output finite {bool(torch.isfinite(out).all())!s:5s}  grads finite {grads_finite!s:5s}"
          f"  max |out - fp32 out| {diff:>9s}  peak {peak_gib()}", flush=True)


def tiny(model: str, device):
    from diffusers import FluxTransformer2DModel

    reference = prepare(FluxTransformer2DModel.from_pretrained(model, subfolder="transformer"), "full", device)
    x, t, cond, target = inputs(reference.config, 16, 32, 2, device)  # the same inputs for every setting
    with torch.no_grad():  # fp32 without autocast: the output every setting is compared with
        ref_out = flux.forward(set_norm(reference, "fp32"))(x, t, cond).float()
    del reference
    for cudnn, kind, checkpointing, norm in itertools.product(("on", "off"), ("lora", "full"), (False, True), ("native", "fp32")):
        set_cudnn(cudnn)
        transformer = FluxTransformer2DModel.from_pretrained(model, subfolder="transformer")
        transformer = prepare(set_norm(transformer, norm), kind, device)
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        reset_peak_memory()
        out, loss, grads_finite = step(transformer, x, t, cond, target, autocast=True)
        report(f"tiny cudnn {cudnn} {kind} {norm} ckpt={checkpointing}", out, loss, grads_finite, ref_out)


def real(norm: str, cudnn: str, checkpointing: bool, resolution: int, device):
    set_cudnn(cudnn)
    from diffusers import FluxTransformer2DModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)
    finally:
        torch.set_default_dtype(previous)
    transformer = prepare(set_norm(transformer, norm), "lora", device)
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    x, t, cond, target = inputs(transformer.config, resolution // 8, flux.DEFAULT_MAX_SEQUENCE_LENGTH, 1, device)
    reset_peak_memory()
    start = time.time()
    out, loss, grads_finite = step(transformer, x, t, cond, target, autocast=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    report(f"FLUX.1-dev lora cudnn {cudnn} {norm} ckpt={checkpointing} {resolution}px ({time.time() - start:.1f} s)", out, loss, grads_finite)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="A tiny FLUX pipeline folder: every tiny setting in one call.")
    p.add_argument("--real", action="store_true", help="FLUX.1-dev's transformer config with random bf16 weights, LoRA.")
    p.add_argument("--norm", choices=("native", "fp32"), default="native")
    p.add_argument("--cudnn", choices=("on", "off"), default="off")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--device", default="cuda", help="cuda; cpu only to try the probe itself.")
    a = p.parse_args()
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("No CUDA device: this probe is for CUDA (--device cpu runs it on the CPU, where both norms work).")
    print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name() if device.type == "cuda" else "cpu", flush=True)
    if a.model:
        tiny(a.model, device)
    if a.real:
        real(a.norm, a.cudnn, a.checkpointing, a.resolution, device)


if __name__ == "__main__":
    main()
