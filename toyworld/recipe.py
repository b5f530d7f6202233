"""The toy fine-tuning recipe shared by `make demo` (scripts/demo.py) and benchmarks/quality.py: flags of
the two training scripts, how they are launched, and the training data they read."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Offline by design (the demo and the quality benchmark import this first, before anything reads these):
# a hub lookup would only slow them down, and can return an empty tokenizer.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

MODEL = ROOT / "models" / "toy-sdxl"

# 32 px images (16x16 latents), a 20-step DDIM grid (stride 50), full fine-tuning of the UNet.
# Learning rate: measured on held-out prompts (benchmarks/quality.py, 120 steps, H100, earlier base): at 1e-4 every
# fine-tune got WORSE than base (standard FT -0.034, SFT-sharpening -0.037, RLHF-sharpening -0.111, its
# relation score collapsing to 0); RLHF at 1e-5 was +0.011 after 60 steps and +0.005 after 120.
# A 1500-step prototype of the current base (text encoders trained), lr 2e-5, 60 steps: all three -0.02 to -0.03; current base, lr 1e-5,
# 100 steps: all within one standard error of base (later held-out results: README, "Demo: the embedded default").
# Caption dropout 0.1 as in the base model's training keeps the unconditional (CFG) branch consistent.
COMMON = {
    "resolution": 32,
    "infer_steps": 20,
    "guidance_scale": 5.0,
    "reward_model": "toy",
    "report_to": "none",
    "seed": 0,
    "train_batch_size": 8,
    "checkpointing_steps": 10**6,
    "proportion_empty_prompts": 0.1,
}
SFT = {"num_noisy_latents": 3, "trajectory_nums": 3, "learning_rate": 1e-5}
# Plain fine-tuning through the same script: one candidate, one state, regressed onto the data image's noise
# (the ordinary diffusion loss on the DDIM grid; never looks at the reward).
# Eq. 8's sum: with one candidate there is nothing to choose, so continuing its path to score it would be wasted work.
STANDARD_FT = {**SFT, "num_noisy_latents": 1, "trajectory_nums": 1, "sft_target": "noise", "path_reward": "sum"}
RLHF = {"num_noisy_latents": 3, "trajectory_nums": 3, "learning_rate": 1e-5}
# The rewards the reward-response and headroom benchmarks use by default: four pixel statistics the base does not
# maximise, and the toy compositional reward.
BENCHMARK_REWARDS = ("brightness", "saturation", "jpeg_compressibility", "jpeg_incompressibility", "toy")


def busy_cores(sample_seconds: float = 1.0) -> float:
    """Cores in use by other processes right now: the non-idle share of /proc/stat's CPU time over a short sample,
    times the core count. The 1-minute load average (the fallback off Linux) still counts a job that ended seconds
    ago, which made the demo start on one thread right after a test run."""
    first = _cpu_jiffies()
    if first is None:
        try:
            return os.getloadavg()[0]
        except OSError:
            return 0.0
    time.sleep(sample_seconds)
    second = _cpu_jiffies()
    busy, total = second[0] - first[0], second[1] - first[1]
    return (os.cpu_count() or 1) * busy / total if total > 0 else 0.0


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) CPU time since boot from /proc/stat's `cpu` line; None where there is none."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def cpu_threads() -> int:
    """Threads per process. On a busy machine torch's spinning OpenMP threads fight other processes:
    there one thread ran the toy UNet 4x faster than two (measured), so use only the idle cores."""
    cores = os.cpu_count() or 1
    return max(1, min(cores, cores - round(busy_cores())))


def flags(settings: dict) -> list[str]:
    """settings -> command-line flags: True switches a flag on, None and False leave it off; every other value,
    0 included, is passed (`value not in (None, False)` would drop 0 == False, e.g. the recipe's `--seed 0`)."""
    out = []
    for key, value in settings.items():
        if value is True:
            out.append(f"--{key}")
        elif value is not None and value is not False:
            out += [f"--{key}", str(value)]
    return out


def flag_value(text: str) -> str | bool:
    """A FLAG=VALUE value from a benchmark's command line: `true` / `false` switch an on/off flag (`use_lora=true`
    becomes `--use_lora`; `FLAG=false` leaves the flag off the command line, so the script's default applies);
    anything else stays a string for the training script's own parser."""
    return {"true": True, "false": False}.get(text.lower(), text)


def override_target(item: str) -> str:
    """The variant a --set item names ("" for every variant): the text before a ':' that comes before the first '='.
    A value may hold colons itself (`reward_model=toy:1.0,brightness:0.5`, a weighted reward mix)."""
    colon, equals = item.find(":"), item.find("=")
    return item[:colon] if colon != -1 and (equals == -1 or colon < equals) else ""


# Training flags the benchmarks set themselves, with the benchmark option that sets them: a --set or --variant value
# would replace them unseen while the report still names the harness's value (another step count, folder or model).
HARNESS_FLAGS = {"output_dir": "--work_dir", "max_train_steps": "--steps", "checkpointing_steps": "--eval_every",
                 "pretrained_model_name_or_path": "--model", "resume_from_checkpoint": None}


def check_settable(key: str, where: str, owned: dict = HARNESS_FLAGS) -> None:
    """Refuse a training flag that the harness owns (`owned`: flag -> the benchmark option that sets it), or that holds
    a secret (it would be written to the run's log and the report's JSON)."""
    from rewards.base import SECRET_ARG_NAMES

    if key in SECRET_ARG_NAMES:
        raise SystemExit(f"{where}: --{key} would be written to the logs and the report; set it in the environment "
                         "(OPENAI_API_KEY) instead.")
    if key in owned:
        option = owned[key]
        raise SystemExit(f"{where}: the benchmark sets --{key} itself" + (f"; use its {option} option." if option else "."))


def check_spec_parts(rewards: list[str], paths: dict[str, str]) -> None:
    """Before any training: each benchmark reward must be one known reward (its name becomes a run folder and a model
    name in evaluate.py's NAME=BASE,unet=PATH specs, where a ',' splits options), and no folder may hold a ','."""
    from reward import parse_reward_spec

    for reward in rewards:
        entries = parse_reward_spec(reward)  # an unknown name fails here, not after the training
        if len(entries) != 1 or entries[0][1] != 1.0 or reward != entries[0][0]:
            raise SystemExit(f"reward {reward!r}: each benchmark run trains on one reward, named alone (its tables score "
                             "each reward by itself); a weighted mix is not one of them.")
    for flag, path in paths.items():
        if "," in str(path):
            raise SystemExit(f"{flag} {path!r}: a ',' in a path breaks evaluate.py's model specs; choose a folder without one.")


def overrides_for(name: str, overrides: list[str], owned: dict = HARNESS_FLAGS) -> dict:
    """The --set values that apply to variant `name` (a flag in `owned` is refused, see check_settable)."""
    out = {}
    for item in overrides:
        target = override_target(item)
        assignment = item[len(target) + 1:] if target else item
        key, sep, value = assignment.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected [VARIANT:]FLAG=VALUE")
        check_settable(key.lstrip("-"), f"--set {item!r}", owned)
        if target in ("", name):
            out[key.lstrip("-")] = flag_value(value)
    return out


def check_evaluable(flags: dict) -> None:
    """Refuse, before any training, a run whose checkpoints the benchmarks cannot evaluate as its output would be."""
    if flags.get("use_lora") is True and flags.get("use_ema") is True:
        raise SystemExit("use_lora with use_ema is not benchmarked: its checkpoints hold the raw adapters, its final "
                         "output the averaged ones; drop one of them.")


def checkpoint_spec(flags: dict, checkpoint: Path, model: str) -> str:
    """How evaluate.py loads a training checkpoint (`--model NAME=BASE,<this>`): the LoRA adapters of a `--use_lora`
    run, the averaged weights of a `--use_ema` run (what its final output holds), else the full denoiser; with the
    prediction type a `--prediction_type` run trained for (a checkpoint folder does not record it)."""
    check_evaluable(flags)
    pred = f",pred={flags['prediction_type']}" if flags.get("prediction_type") else ""
    if flags.get("use_lora") is True:
        return f"lora={checkpoint}{pred}"
    if flags.get("use_ema") is True:
        from sharpening.families import family_of

        return f"unet={checkpoint / f'{family_of(model).DENOISER}_ema'}{pred}"
    return f"unet={checkpoint}{pred}"


def launch(script: str, settings: dict, log: Path, threads: int | None = None) -> float:
    """`accelerate launch` one training script (1 process), output to `log`; returns the seconds it took. The run's
    --output_dir belongs to this harness: what an earlier run left there is removed first, so no checkpoint of it is
    evaluated as this run's (and the trainer refuses to start a run among another run's checkpoints)."""
    output = Path(settings["output_dir"])
    if output.exists():
        shutil.rmtree(output)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / script), *flags(settings)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(log, "w") as handle:
        handle.write(" ".join(cmd) + "\n\n")
        handle.flush()
        result = subprocess.run(cmd, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = log.read_text().splitlines()[-40:]
        raise SystemExit(f"{script} failed (exit {result.returncode}); the end of {log}:\n" + "\n".join(tail))
    (output / RUN_FLAGS_FILE).write_text(json.dumps(run_record(script, settings), sort_keys=True, indent=1))
    return time.time() - started


RUN_FLAGS_FILE = "benchmark_run_flags.json"  # what launch() trained a run with, for --skip_training to check


def run_record(script: str, settings: dict) -> dict:
    """The script and flags of a run as its RUN_FLAGS_FILE holds them (paths as text)."""
    return json.loads(json.dumps({"script": script, **settings}, default=str))


def check_trained_with(script: str, settings: dict) -> None:
    """--skip_training re-scores a run already in its folder: refuse unless it was trained with exactly these flags
    (another --steps, --set or --variant would be reported as if the run had used it)."""
    path = Path(settings["output_dir"]) / RUN_FLAGS_FILE
    if not path.is_file():
        raise SystemExit(f"--skip_training: {settings['output_dir']} holds no run this benchmark trained ({RUN_FLAGS_FILE} is "
                         "missing); run without --skip_training.")
    saved, now = json.loads(path.read_text()), run_record(script, settings)
    changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
    if changed:
        raise SystemExit(f"--skip_training: {settings['output_dir']} was trained with other flags ("
                         + "; ".join(f"{k}: {saved.get(k)!r} then, {now.get(k)!r} now" for k in changed)
                         + "); rerun with the options it was trained with, or without --skip_training.")


def training_captions(prompts: int | None = None) -> list[str]:
    """Compositions of the TRAIN object pairs only (held-out pairs stay unseen until evaluation), in the world's fixed
    shuffled order; `prompts`: only the first N of them, the ones `evaluate.py --toy_split train_pairs --num_prompts N`
    scores."""
    from toyworld import world

    pairs = world.train_pair_prompts()
    if prompts is not None and not 1 <= prompts <= len(pairs):
        raise ValueError(f"prompts must be in 1..{len(pairs)} (the training-pair captions), got {prompts}")
    return pairs[:prompts]


def write_data(folder: Path, images: int, seed: int = 1, prompts: int | None = None) -> tuple[Path, Path]:
    """An imagefolder (SFT) and a prompt file (RLHF) of `training_captions(prompts)`: with `prompts` = N only the
    first N training-pair captions, so that each is trained on more often."""
    from toyworld import world

    captions = training_captions(prompts)
    images_dir = world.write_imagefolder(folder / "images", captions, images, seed)
    prompt_file = world.write_prompt_file(folder / "train_prompts.txt", captions)
    return images_dir, prompt_file
