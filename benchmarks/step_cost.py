#!/usr/bin/env python
"""Cost of one optimizer step: our SFT / RLHF steps against the upstream release's way of doing the same work.

    python benchmarks/step_cost.py                                  # tiny SDXL on CPU, both variants (< 3 min)
    python benchmarks/step_cost.py --variant sft --n 3 --m 3 --batch_size 2 --json out.json
    python benchmarks/step_cost.py --preset gpu                     # real-size random SDXL, 512 px, 4 configs

"Ours" is the real step function of each script (`sft_step`, `rlhf_step`) run through the real `Trainer`,
followed by the Trainer's own update (`train_micro_batch`: clip, optimizer, LR scheduler, zero_grad), exactly the
body of `Trainer.train` for one micro-batch with no accumulation.

"Baseline" does the same work the way the upstream release does (Gen-Verse/Diffusion-Sharpening at commit 78c79f9), on the SAME
Trainer: same UNet, VAE, text encoders, reward, optimizer, accelerate autocast / loss scaler, batch, n, m,
resolution and per-step generator (SFT draws t and the noises from it in the same order as ours; RLHF draws its
n*B rollout noises first, so its starts and noises differ from ours, at the same cost per step):
  * every one of the n candidates runs through the UNet WITH grad at each of the m steps, no CFG;
  * the DDIM state is NOT detached along the chain, so the loss back-propagates through the sampler;
  * the x0 preview of every step is decoded with autograd on, n*B images per decode call, in fp32;
  * the reward is asked one image at a time (n*B*m calls, as the upstream grader does);
  * SFT: loss = mean over steps of the MSE to the original noise, of the best path (mean of step rewards);
  * RLHF: n*B images generated without CFG by the current model (--infer_steps DDIM, no grad) and re-noised
    with their own seed noise; reference MSE once at the first state; best and worst path;
    (ours generates B images WITH CFG, i.e. 2B rows per grid step: at n = 2 the two rollouts cost the same);
    loss = -(log sigmoid(beta * logits) - (r_w - r_l)) with the reward gap outside the sigmoid;
  * one backward, then the same update (`Trainer.train_micro_batch`) as ours.
What the baseline has from us, because the upstream code cannot run otherwise: our batched per-sample
DDIM step, per-prompt argmax/argmin, and start timesteps drawn on the DDIM grid (so both do m steps).

Measured per optimizer step: wall time (median over --steps steps after --warmup warm-up steps; ours and
baseline interleaved, alternating which goes first, because the machine may be shared) and the process's CPU
time (steadier than wall time on a shared CPU; meaningless on CUDA), UNet calls and rows
with and without grad (forward pre-hooks on the trained UNet and on the reference copy), VAE decode calls and
images (and how many were decoded with an autograd graph), reward calls and images (wrapping
`reward.evaluate`), and peak memory growth above the level right before the step:
  * CPU: process RSS. Before each step freed heap memory is returned with malloc_trim(0) and the kernel's
    peak-RSS mark is reset (/proc/self/clear_refs = 5); the peak is VmHWM read after the step, so nothing is
    missed between samples. Without clear_refs a background thread samples RSS every millisecond.
  * CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated() before.
The level right before a step holds the models AND the optimizer state (created in the warm-up step); the
growth is what the step itself needs: activations, decoded images, and the gradient buffers (the Trainer
zeroes grads with set_to_none, so they are rebuilt every step, by ours and the baseline alike); the ratio is
also printed without them, which is what the design changes (activations, decode graphs).
The level after loading (before any step) is printed too. On CPU torch runs with --threads (default 1).

Models (--model):
  * tiny (default): sharpening.tiny.build_tiny_sdxl (diffusers' SDXL test sizes; VAE downsamples by 2).
  * sdxl-random: every part real size, built from SDXL-base-1.0's configs with random weights by
    sharpening.tiny.build_sdxl_size and saved (bf16, about 7 GB, a minute) to a temp folder or --model_path:
    the UNet (2.6 B parameters), the VAE (kept fp32, as the Trainer keeps the stock SDXL VAE), CLIP ViT-L/14 and
    OpenCLIP bigG text encoders, CLIP's BPE tokenizer. The Trainer loads it like any checkpoint. Only sensible on
    a GPU.
Reward: the cheap built-in `brightness` reward (mean luma), so the figures are the
trainer's own cost; an expensive or remote reward makes the baseline's one-image-at-a-time calls worse.

--preset gpu runs --model sdxl-random at 512 px, n = m = 3, batch 1, bf16 and fp16, gradient checkpointing
off and on (4 configurations, each in its own process so an out-of-memory error cannot leak into the next),
and prints all tables and a summary. A baseline that runs out of GPU memory is reported as OOM with the peak
it reached; ours is measured anyway.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

MB = 1024 * 1024
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
IMPLS = ("ours", "baseline")
COUNTERS = (
    "unet_grad_calls", "unet_grad_rows", "unet_nograd_calls", "unet_nograd_rows",
    "vae_decode_calls", "vae_decode_images", "vae_decode_images_with_graph", "reward_calls", "reward_images",
)
# Targets we set ourselves (reported, not asserted): SFT on the tiny model at n = m = 3, batch 2.
TARGETS = {"time": 0.6, "peak_growth": 0.4}

# ------------------------------------------------------------------------------------------------ flags
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="both", choices=["sft", "rlhf", "both"])
    p.add_argument("--n", type=int, default=3, help="Candidates per prompt (--num_noisy_latents).")
    p.add_argument("--m", type=int, default=3, help="DDIM steps per trajectory (--trajectory_nums).")
    p.add_argument("--batch_size", type=int, default=2, help="Prompts per micro-batch (--train_batch_size).")
    p.add_argument("--resolution", type=int, default=None, help="Pixels (default: 32 for tiny, i.e. 16x16 latents as in the tests; 512 for sdxl-random).")
    p.add_argument("--infer_steps", type=int, default=25, help="DDIM grid (and RLHF rollout length), as the scripts' default.")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--use_lora", action="store_true", help="Train LoRA adapters instead of the full UNet (both sides).")
    p.add_argument("--sft_target", default=None, help="Ours: the SFT script's --sft_target (default: the script's default).")
    p.add_argument("--dpo_target", default=None, help="Ours: the RLHF script's --dpo_target (default: the script's default).")
    p.add_argument("--path_reward", default=None, choices=["sum", "mean", "final"],
                   help="Ours: the scripts' --path_reward (default: each script's default; the baseline always sums previews).")
    p.add_argument("--steps", type=int, default=5, help="Measured optimizer steps per implementation.")
    p.add_argument("--warmup", type=int, default=1, help="Unmeasured steps first (they also create the optimizer state).")
    p.add_argument("--budget_s", type=float, default=None,
                   help="Stop measuring a variant after this many seconds of measured steps (at least one step each).")
    p.add_argument("--model", default="tiny", choices=["tiny", "sdxl-random"])
    p.add_argument("--model_path", "--tiny_path", dest="model_path", default=None,
                   help="An existing folder of the --model (default: build one in a temp dir).")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU only: torch intra-op threads (default 1: on a shared machine, OpenMP threads that wait for busy "
                        "cores make the tiny model's small ops ~50x slower; both sides use the same setting).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="OUT", help="Write all figures to this JSON file.")
    p.add_argument("--preset", default=None, choices=["gpu"],
                   help="gpu: sdxl-random, 512 px, n=m=3, batch 1, {bf16, fp16} x {checkpointing off, on}.")
    args = p.parse_args(argv)
    if min(args.n, args.m, args.batch_size, args.steps) < 1 or args.warmup < 0:
        p.error("--n, --m, --batch_size and --steps must be >= 1, --warmup >= 0.")
    if args.resolution is None:
        args.resolution = 512 if args.model == "sdxl-random" else 32
    return args


# ------------------------------------------------------------------------------------------------ memory
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)\s+kB", f.read()).group(1)) * 1024


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _hwm_bytes()
        return True
    except (OSError, AttributeError):
        return False


class MemoryMeter:
    """Peak memory of one step above the level right before it (process RSS on CPU, allocated on CUDA)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.method = "cuda max_memory_allocated" if self.cuda else ("RSS, VmHWM reset by clear_refs" if _can_reset_hwm() else "RSS sampled every 1 ms")
        self._sampler = None

    def level(self) -> int:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        if _LIBC is not None:
            _LIBC.malloc_trim(0)  # give freed heap pages back, so the level is what is really live
        return _rss_bytes()

    def start(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        elif self.method.startswith("RSS, VmHWM"):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        else:
            self._sampler = _RssSampler()

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        if self._sampler is None:
            return max(_hwm_bytes(), _rss_bytes())
        peak, self._sampler = self._sampler.stop(), None
        return peak


class _RssSampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self._stop = _rss_bytes(), threading.Event()
        self.start()

    def run(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss_bytes())

    def stop(self) -> int:
        self._stop.set()
        self.join()
        return max(self.peak, _rss_bytes())


# ------------------------------------------------------------------------------------------------ counting
class CallCounter:
    """Counts UNet forwards (trained UNet and reference copy), VAE decodes and reward calls of the trainer."""

    def __init__(self, trainer):
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.handles = []
        for unet in {id(u): u for u in (trainer.model.raw_unet, trainer.model.reference_unet) if u is not None}.values():
            self.handles.append(unet.register_forward_pre_hook(self._unet_hook, with_kwargs=True))
        vae = trainer.parts.vae
        decode = vae.decode

        def counting_decode(z, *a, **k):
            self.counts["vae_decode_calls"] += 1
            self.counts["vae_decode_images"] += z.shape[0]
            if torch.is_grad_enabled() and z.requires_grad:
                self.counts["vae_decode_images_with_graph"] += z.shape[0]
            return decode(z, *a, **k)

        vae.decode = counting_decode
        evaluate = trainer.reward.evaluate

        def counting_evaluate(images, prompts):
            self.counts["reward_calls"] += 1
            self.counts["reward_images"] += len(images)
            return evaluate(images, prompts)

        trainer.reward.evaluate = counting_evaluate

    def _unet_hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        kind = "grad" if torch.is_grad_enabled() else "nograd"
        self.counts[f"unet_{kind}_calls"] += 1
        self.counts[f"unet_{kind}_rows"] += sample.shape[0]

    def take(self) -> dict:
        out, self.counts = self.counts, dict.fromkeys(COUNTERS, 0)
        return out


# ------------------------------------------------------------------------------------------------ models
def write_data(workdir: Path, variant: str, count: int, resolution: int) -> list[str]:
    """Script flags for the data: an imagefolder (SFT) or a prompt file (RLHF)."""
    import numpy as np
    from PIL import Image

    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    captions = [f"a photo of a {colours[i % len(colours)]} cube on a table, number {i}" for i in range(count)]
    if variant == "rlhf":
        path = workdir / "prompts.txt"
        path.write_text("\n".join(captions) + "\n")
        return ["--prompt_file", str(path)]
    folder = workdir / "images"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, caption in enumerate(captions):
        name = f"img_{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)).save(folder / name)
        rows.append({"file_name": name, "text": caption})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return ["--train_data_dir", str(folder)]


def build_trainer(args: argparse.Namespace, variant: str, model_path: str, workdir: Path):
    """The real Trainer, built the way each script's main() builds it, from the script's own parse_args."""
    from sharpening.training import Trainer

    count = args.batch_size * 2
    argv = [
        "--pretrained_model_name_or_path", model_path, "--output_dir", str(workdir / f"out-{variant}"),
        "--resolution", str(args.resolution), "--train_batch_size", str(args.batch_size),
        "--num_noisy_latents", str(args.n), "--trajectory_nums", str(args.m), "--infer_steps", str(args.infer_steps),
        "--learning_rate", "1e-6", "--max_train_steps", "1000000", "--checkpointing_steps", "1000000",
        "--seed", str(args.seed), "--reward_model", "brightness",
        "--report_to", "none", "--mixed_precision", args.mixed_precision,
    ] + write_data(workdir, variant, count, args.resolution)
    if args.gradient_checkpointing:
        argv.append("--gradient_checkpointing")
    if args.use_lora:
        argv.append("--use_lora")
    target = args.sft_target if variant == "sft" else args.dpo_target
    if target:
        argv += [f"--{variant.replace('rlhf', 'dpo')}_target", target]
    if args.path_reward:
        argv += ["--path_reward", args.path_reward]
    if variant == "sft":
        import train_sft_diffusion_sharpening_sdxl as script
        from sharpening.data import ImageTextDataset, collate_image_text, load_hf_dataset

        a = script.parse_args(argv)
        dataset = ImageTextDataset(load_hf_dataset(None, a.train_data_dir), "image", "text", a.resolution, False, False, a.seed)
        trainer = Trainer(a, dataset, collate_image_text, needs_reference=False, variant="SFT")
        return trainer, script.sft_step
    import train_rlhf_diffusion_sharpening_sdxl as script
    from sharpening.data import PromptDataset, collate_prompts

    a = script.parse_args(argv)
    trainer = Trainer(a, PromptDataset(script.load_prompts(a)), collate_prompts, needs_reference=True, variant="RLHF")
    return trainer, script.rlhf_step


def release(trainer, sigterm_handler) -> None:
    """Free the trainer's models; the next variant's Accelerator reuses accelerate's process state (same
    precision and device), so no reset is needed."""
    trainer.accelerator.free_memory()
    signal.signal(signal.SIGTERM, sigterm_handler)  # the Trainer's handler holds a reference to it


# ------------------------------------------------------------------------------------------------ baseline
def _decode_with_autograd(vae, latents: torch.Tensor):
    """Upstream: vae.decode of the x0 preview with autograd on (activations kept until the PIL conversion)."""
    import numpy as np
    from PIL import Image

    from sharpening.sdxl import latent_scale

    pixels = vae.decode(latents.to(vae.device, vae.dtype) / latent_scale(vae)).sample
    arrays = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arrays]


def _upstream_trajectory(trainer, x0: torch.Tensor, x: torch.Tensor, index: torch.Tensor, cond_n, noise: torch.Tensor, prompts_n: list[str]):
    """The upstream trajectory loop (upstream train_sft_diffusion_sharpen_sdxl.py L1055-1109): n*B candidates with grad at each of the m
    steps, states not detached, x0 previews decoded with autograd on, one reward request per image.
    Returns (mean-over-steps MSE with its graph, mean-over-steps reward), both (n*B,)."""
    from sharpening.losses import per_sample_mse

    model = trainer.policy(grad=True)
    sampler, vae, reward = trainer.sampler, trainer.parts.vae, trainer.reward
    losses, rewards = [], []
    for _ in range(trainer.num_steps):
        t = sampler.grid[index]
        eps = model(x, t, cond_n)  # WITH grad for every candidate
        target = sampler.target(x0, noise, t)  # the original noise at every step
        x, x0_hat = sampler.step(eps, index, x)  # x is NOT detached: the next loss back-propagates through here
        images = _decode_with_autograd(vae, x0_hat)
        rewards.append(torch.stack([reward.evaluate([image], [prompt]).total[0] for image, prompt in zip(images, prompts_n)]).float())
        losses.append(per_sample_mse(eps, target))
        index = index + 1
    return torch.stack(losses).mean(0), torch.stack(rewards).mean(0)  # mean over steps


def baseline_sft_step(trainer, batch: dict, generator: torch.Generator):
    """SFT the upstream way (upstream train_sft_diffusion_sharpen_sdxl.py L1021-1123) on the same inputs and draws as `sft_step`."""
    from sharpening.training import StepResult
    from sharpening.trajectory import draw_start_indices, select

    n, captions = trainer.args.num_noisy_latents, batch["captions"]
    batch_size = len(captions)
    time_ids = trainer.family.time_ids(batch["original_sizes"], batch["crops_top_left"], (trainer.args.resolution,) * 2)
    x0 = trainer.encode_images(batch["pixel_values"], generator)
    cond_n = trainer.conditioning(captions, time_ids).repeat(n)
    start = draw_start_indices(trainer.sampler, batch_size, trainer.num_steps, generator).repeat(n)
    noise = trainer.randn((n * batch_size, *x0.shape[1:]), generator)
    x0_n = x0.repeat(n, 1, 1, 1)
    x = trainer.sampler.add_noise(x0_n, noise, trainer.sampler.grid[start])
    mse, rewards = _upstream_trajectory(trainer, x0_n, x, start, cond_n, noise, captions * n)
    sel = select(rewards, n)
    rows = sel.winner.to(mse.device) * batch_size + torch.arange(batch_size, device=mse.device)
    return StepResult(mse[rows], sel.has_winner.to(mse.device))  # loss = l[argmax r] (per prompt)


def baseline_rlhf_step(trainer, batch: dict, generator: torch.Generator):
    """RLHF the upstream way (upstream train_rlhf_diffusion_sharpen_sdxl.py L1028-1163) on the same prompts as `rlhf_step`."""
    import torch.nn.functional as F

    from sharpening.losses import per_sample_mse
    from sharpening.sampler import sample
    from sharpening.training import StepResult
    from sharpening.trajectory import draw_start_indices, select

    args, sampler = trainer.args, trainer.sampler
    n, prompts = args.num_noisy_latents, batch["captions"]
    batch_size = len(prompts)
    cond_n = trainer.conditioning(prompts, trainer.default_time_ids(batch_size)).repeat(n)
    noise = trainer.randn(trainer.latent_shape(n * batch_size), generator)
    x0 = sample(trainer.policy(grad=False), sampler, noise, cond_n)  # n images per prompt, no CFG, no grad
    start = draw_start_indices(sampler, batch_size, trainer.num_steps, generator).repeat(n)
    t = sampler.grid[start]
    x = sampler.add_noise(x0, noise, t)  # re-noised with the SAME noise
    with torch.no_grad():  # reference once, at the first state only
        ref_mse = per_sample_mse(trainer.reference(x, t, cond_n), sampler.target(x0, noise, t))
    mse, rewards = _upstream_trajectory(trainer, x0, x, start, cond_n, noise, prompts * n)
    sel = select(rewards, n)
    arange = torch.arange(batch_size, device=mse.device)
    w, l = sel.winner.to(mse.device) * batch_size + arange, sel.loser.to(mse.device) * batch_size + arange
    logits = (ref_mse[w] - ref_mse[l]) - (mse[w] - mse[l])
    gap = (sel.winner_reward - sel.loser_reward).to(mse.device)
    # The reward gap sits outside the sigmoid: a constant, kept for fidelity; masked so ties cannot NaN.
    return StepResult(-F.logsigmoid(args.beta_dpo * logits) + torch.nan_to_num(gap), sel.has_pair.to(mse.device))


# ------------------------------------------------------------------------------------------------ measuring
def optimizer_step(trainer, step_fn, batch: dict, generator: torch.Generator) -> str:
    """One micro-batch and one update, as the body of Trainer.train does it (no accumulation)."""
    from sharpening.training import UpdateWindow

    return trainer.train_micro_batch(step_fn, batch, generator, UpdateWindow())


def measure(trainer, step_fn, batch, seed: int, counter: CallCounter, memory: MemoryMeter) -> dict:
    from sharpening.training import mix_seed

    counter.take()
    level = memory.level()
    memory.start()
    cuda = memory.cuda
    start, start_cpu = time.perf_counter(), time.process_time()
    oom = False
    try:
        outcome = optimizer_step(trainer, step_fn, batch, torch.Generator().manual_seed(mix_seed(seed)))
        if cuda:
            torch.cuda.synchronize()
    except OUT_OF_MEMORY:
        oom, outcome = True, "oom"
    elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    peak = memory.peak()
    if oom:  # leave the trainer usable for the other implementation
        trainer.optimizer.zero_grad(set_to_none=True)
        scaler = trainer.accelerator.scaler
        if scaler is not None:
            # An OOM between unscale_ and update() leaves the scaler "unscaled", and the next unscale_ would
            # raise; update() finishes that step (and resets the scaler). Before unscale_ there is nothing to do.
            try:
                scaler.update()
            except AssertionError:  # "No inf checks were recorded": the OOM came before unscale_
                pass
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return {"time_s": elapsed, "cpu_s": cpu, "level_mb": level / MB, "peak_growth_mb": (peak - level) / MB, "outcome": outcome, **counter.take()}


def take_batches(trainer, count: int) -> list[dict]:
    """Micro-batches from the Trainer's own (accelerate-prepared) loader, fetched before timing starts."""
    batches = []
    while len(batches) < count:
        for batch in trainer.loader:
            batches.append(batch)
            if len(batches) == count:
                break
    return batches


def summarise(records: list[dict]) -> dict:
    if not records:
        return {"steps": 0}
    out = {"steps": len(records), "outcomes": [r["outcome"] for r in records]}
    if any(r["outcome"] == "oom" for r in records):
        out["oom"] = True
    out["time_s"] = statistics.median(r["time_s"] for r in records)
    out["time_s_all"] = [round(r["time_s"], 4) for r in records]
    out["cpu_s"] = statistics.median(r["cpu_s"] for r in records)
    out["peak_growth_mb"] = statistics.median(r["peak_growth_mb"] for r in records)
    out["peak_growth_mb_max"] = max(r["peak_growth_mb"] for r in records)
    out["level_mb"] = statistics.median(r["level_mb"] for r in records)
    for key in COUNTERS:
        out[key] = int(statistics.median(r[key] for r in records))
    return out


def run_variant(args: argparse.Namespace, variant: str, model_path: str, workdir: Path) -> dict:
    previous_handler = signal.getsignal(signal.SIGTERM)
    t_build = time.perf_counter()
    trainer, ours_fn = build_trainer(args, variant, model_path, workdir)
    import logging

    logging.getLogger().setLevel(logging.WARNING)
    build_s = time.perf_counter() - t_build
    try:
        memory = MemoryMeter(trainer.device)
        loaded_mb = memory.level() / MB
        counter = CallCounter(trainer)
        impls = {"ours": ours_fn, "baseline": baseline_sft_step if variant == "sft" else baseline_rlhf_step}
        total = args.warmup + args.steps
        batches = take_batches(trainer, min(total, 4))
        records = {name: [] for name in IMPLS}
        broken: set[str] = set()
        measuring_since = None
        for i in range(total):
            if i == args.warmup:
                measuring_since = time.perf_counter()
            order = IMPLS if i % 2 == 0 else IMPLS[::-1]
            for name in order:
                if name in broken:
                    continue
                record = measure(trainer, impls[name], batches[i % len(batches)], args.seed * 1000 + i, counter, memory)
                if record["outcome"] == "oom":
                    broken.add(name)  # report the OOM, do not retry it
                    records[name].append(record)
                elif i >= args.warmup:
                    records[name].append(record)
            done = all(records[name] or name in broken for name in IMPLS)
            if args.budget_s and measuring_since and done and time.perf_counter() - measuring_since > args.budget_s:
                break
        grad_mb = sum(p.numel() * p.element_size() for p in trainer.model.trainable_params) / MB
        result = {"build_s": build_s, "loaded_mb": loaded_mb, "memory_method": memory.method, "device": str(trainer.device),
                  "num_steps_m": trainer.num_steps, "trainable_params_m": sum(p.numel() for p in trainer.model.trainable_params) / 1e6,
                  "grad_buffers_mb": grad_mb}
        result |= {name: summarise(records[name]) for name in IMPLS}
        result["ratios"] = ratios(result["ours"], result["baseline"], grad_mb)
        return result
    finally:
        release(trainer, previous_handler)
        del trainer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def ratios(ours: dict, base: dict, grad_mb: float = 0.0) -> dict:
    def ratio(key, minus=0.0):
        if not ours.get("steps") or not base.get("steps") or ours.get("oom") or base.get("oom"):
            return None
        return (ours[key] - minus) / (base[key] - minus) if base[key] - minus > 0 else None

    # The gradient buffers (one per trainable parameter) are rebuilt by both sides every step; without them
    # the peak-growth ratio compares what the step's design changes: activations and decodes.
    out = {"time": ratio("time_s"), "cpu_time": ratio("cpu_s"), "unet_grad_rows": ratio("unet_grad_rows"),
           "peak_growth": ratio("peak_growth_mb"), "peak_growth_without_grads": ratio("peak_growth_mb", grad_mb)}
    if base.get("oom") and ours.get("steps") and not ours.get("oom") and base.get("peak_growth_mb", 0) > 0:
        # The baseline ran out of memory after growing this much: the true ratio is at most this.
        out["peak_growth_at_most"] = ours["peak_growth_mb"] / base["peak_growth_mb"]
    return out


# ------------------------------------------------------------------------------------------------ output
def _fmt_ratio(value) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def format_table(config: dict, variant: str, res: dict) -> str:
    head = (
        f"{variant.upper()}  model={config['model']} device={res['device']} {config['resolution']} px  n={config['n']} m={res['num_steps_m']} "
        f"B={config['batch_size']}  mixed_precision={config['mixed_precision']}  gradient_checkpointing={'on' if config['gradient_checkpointing'] else 'off'}"
        f"{'  LoRA' if config.get('use_lora') else ''}  trainable {res['trainable_params_m']:.3g} M params\n"
        f"  memory: {res['memory_method']}; level after loading {res['loaded_mb']:.0f} MB; build {res['build_s']:.1f} s"
    )
    cols = f"  {'impl':<9} {'time/step':>10} {'cpu/step':>9} {'steps':>5}  {'UNet grad':>14} {'UNet no-grad':>14}  {'VAE decode':>15}  {'reward':>12}  {'peak growth':>12}  {'level':>9}  outcomes"
    lines = [head, cols, "  " + "-" * (len(cols) - 2)]
    for name in IMPLS:
        r = res[name]
        if not r.get("steps"):
            lines.append(f"  {name:<9} (not measured)")
            continue
        oom = " OOM" if r.get("oom") else ""
        graph = f"/{r['vae_decode_images_with_graph']}g" if r["vae_decode_images_with_graph"] else ""
        time_s = "OOM" if r.get("oom") else f"{r['time_s']:.3f} s"
        peak = f">={r['peak_growth_mb']:.0f} MB" if r.get("oom") else f"{r['peak_growth_mb']:.1f} MB"
        lines.append(
            f"  {name:<9} {time_s:>10} {r['cpu_s']:>7.3f} s {r['steps']:>5}  {r['unet_grad_calls']:>4} ({r['unet_grad_rows']:>4} rows) {r['unet_nograd_calls']:>4} ({r['unet_nograd_rows']:>4} rows)"
            f"  {r['vae_decode_calls']:>4} ({r['vae_decode_images']:>3}{graph} img)  {r['reward_calls']:>3} ({r['reward_images']:>3} img)"
            f"  {peak:>12}  {r['level_mb']:>6.0f} MB  {','.join(sorted(set(r['outcomes'])))}{oom}"
        )
    q = res["ratios"]
    lines.append(
        f"  ours/baseline: time {_fmt_ratio(q['time'])} (process CPU time {_fmt_ratio(q['cpu_time'])}), grad UNet rows {_fmt_ratio(q['unet_grad_rows'])}, "
        f"peak memory growth {_fmt_ratio(q['peak_growth'])} ({_fmt_ratio(q['peak_growth_without_grads'])} without the {res['grad_buffers_mb']:.0f} MB of gradient buffers both rebuild)"
    )
    if q.get("peak_growth_at_most") is not None:
        lines.append(f"  baseline ran out of memory: peak memory growth ratio <= {q['peak_growth_at_most']:.2f}x")
    if res["ours"].get("steps"):
        lines.append(f"  times (s): ours {res['ours']['time_s_all']}  baseline {res['baseline'].get('time_s_all', [])}")
    return "\n".join(lines)


def target_lines(config: dict, results: dict) -> list[str]:
    """Issue 6's targets apply to SFT on the tiny model at n = m = 3, batch 2."""
    if "sft" not in results:
        return []
    on_spec = config["model"] == "tiny" and config["n"] == 3 and config["m"] == 3 and config["batch_size"] == 2
    q = results["sft"]["ratios"]
    out = [f"Targets (SFT{'' if on_spec else ', NOT the target configuration tiny n=m=3 B=2'}):"]
    for key, label in (("time", "step time"), ("cpu_time", "step CPU time"), ("peak_growth", "peak memory growth")):
        value, goal = q[key], TARGETS["time" if key == "cpu_time" else key]
        if value is None:
            out.append(f"  {label}: not measurable (a side did not finish)")
        elif value <= goal:
            out.append(f"  {label}: {value:.2f}x <= {goal}x  met")
        else:
            out.append(f"  {label}: {value:.2f}x > {goal}x  MISSED by {value - goal:.2f} ({value / goal:.2f}x the target)")
    return out


# ------------------------------------------------------------------------------------------------ main
def config_of(args: argparse.Namespace) -> dict:
    keys = ("model", "n", "m", "batch_size", "resolution", "infer_steps", "mixed_precision", "gradient_checkpointing", "use_lora", "sft_target", "dpo_target", "path_reward", "steps", "warmup", "seed", "threads")
    return {k: getattr(args, k) for k in keys}


def environment() -> dict:
    env = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "cpu_threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def _quiet_libraries() -> None:
    """Keep the tables readable: no progress bars or load-time notices from the libraries."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.utils.logging.set_verbosity_error()
    except ImportError:
        pass


def run(args: argparse.Namespace) -> dict:
    _quiet_libraries()
    if args.model == "sdxl-random" and not torch.cuda.is_available():
        print("warning: --model sdxl-random on CPU is very slow and needs ~60 GB of RAM; it is meant for a GPU.", file=sys.stderr)
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise SystemExit("--mixed_precision fp16 needs a CUDA GPU (use no or bf16 on CPU).")
    threads = torch.get_num_threads()
    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict:
    variants = ["sft", "rlhf"] if args.variant == "both" else [args.variant]
    config = config_of(args)
    results = {}
    with tempfile.TemporaryDirectory(prefix="step_cost_") as tmp:
        workdir = Path(tmp)
        model_path = args.model_path or build_model(args.model, workdir)
        for variant in variants:
            vdir = workdir / variant
            vdir.mkdir()
            results[variant] = run_variant(args, variant, model_path, vdir)
            print(format_table(config, variant, results[variant]), flush=True)
            print(flush=True)
    for line in target_lines(config, results):
        print(line)
    return {"config": config, "environment": environment(), "results": results}


GPU_PRESET = [("bf16", False), ("bf16", True), ("fp16", False), ("fp16", True)]


def build_model(model: str, workdir: Path) -> str:
    from sharpening.tiny import build_sdxl_size, build_tiny_sdxl

    return str(build_tiny_sdxl(workdir / "tiny-sdxl") if model == "tiny" else build_sdxl_size(workdir / "sdxl-size"))


def run_gpu_preset(args: argparse.Namespace) -> dict:
    """4 configurations, each in a fresh process (an OOM or a fragmented allocator cannot leak into the next)."""
    if not torch.cuda.is_available():
        raise SystemExit("--preset gpu needs a CUDA GPU.")
    deadline = time.perf_counter() + 330  # the whole preset stays under 6 minutes
    runs = []
    env = dict(os.environ)
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    with tempfile.TemporaryDirectory(prefix="step_cost_gpu_") as tmp:
        model_path = args.model_path or build_model("sdxl-random", Path(tmp))  # once, for the 4 configurations
        for i, (precision, checkpointing) in enumerate(GPU_PRESET):
            left = deadline - time.perf_counter()
            label = f"{precision}, gradient checkpointing {'on' if checkpointing else 'off'}"
            if left < 60:
                print(f"=== {label}: skipped, the preset's time budget is spent", flush=True)
                runs.append({"mixed_precision": precision, "gradient_checkpointing": checkpointing, "error": "skipped: time budget"})
                continue
            out = Path(tmp) / f"run{i}.json"
            cmd = [
                sys.executable, str(Path(__file__).resolve()), "--model", "sdxl-random", "--resolution", "512",
                "--n", str(args.n), "--m", str(args.m), "--batch_size", "1", "--mixed_precision", precision,
                "--steps", "3", "--warmup", "1", "--budget_s", "20", "--variant", args.variant, "--seed", str(args.seed),
                "--json", str(out), "--model_path", model_path,
            ] + (["--gradient_checkpointing"] if checkpointing else [])
            print(f"=== {label}: {' '.join(cmd[1:])}", flush=True)
            started = time.perf_counter()
            try:
                proc = subprocess.run(cmd, env=env, timeout=max(30, left - 5))
                code = proc.returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
            wall = time.perf_counter() - started
            if code == 0 and out.exists():
                run_result = json.loads(out.read_text())
                run_result["wall_s"] = wall
                runs.append(run_result)
            else:
                print(f"=== {label}: failed ({code})", flush=True)
                runs.append({"mixed_precision": precision, "gradient_checkpointing": checkpointing, "error": f"exit {code}", "wall_s": wall})
    print("\nSummary (sdxl-random, 512 px, n=%d, m=%d, batch 1; ours/baseline):" % (args.n, args.m))
    print(f"  {'precision':<9} {'ckpt':<4} {'variant':<7} {'ours s':>8} {'base s':>8} {'time':>7} {'grad rows':>9} {'ours grow':>11} {'base grow':>11} {'growth':>7} {'w/o grads':>9}")
    for r in runs:
        if "error" in r:
            print(f"  {r['mixed_precision']:<9} {'on' if r['gradient_checkpointing'] else 'off':<4} {r['error']}")
            continue
        c = r["config"]
        for variant, res in r["results"].items():
            o, b, q = res["ours"], res["baseline"], res["ratios"]
            ot, bt = ("OOM" if r_.get("oom") else f"{r_['time_s']:.2f}" for r_ in (o, b))
            op, bp = ((">=" if r_.get("oom") else "") + f"{r_['peak_growth_mb'] / 1024:.2f} GB" for r_ in (o, b))
            print(f"  {c['mixed_precision']:<9} {'on' if c['gradient_checkpointing'] else 'off':<4} {variant:<7} {ot:>8} {bt:>8} {_fmt_ratio(q['time']):>7}"
                  f" {_fmt_ratio(q['unet_grad_rows']):>9} {op:>11} {bp:>11} {_fmt_ratio(q['peak_growth']):>7} {_fmt_ratio(q.get('peak_growth_without_grads')):>9}"
                  + (f"  (baseline OOM: peak ratio <= {q['peak_growth_at_most']:.2f}x)" if q.get("peak_growth_at_most") is not None else ""))
    print(f"  preset wall time: {time.perf_counter() - (deadline - 330):.0f} s")
    return {"preset": "gpu", "runs": runs}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report = run_gpu_preset(args) if args.preset == "gpu" else run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main()
