"""Offline fixtures: a tiny SDXL, SD3 and FLUX saved once per test session, tiny image-text data, script runners."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

# Without these, a hub id makes transformers retry for minutes and then return an EMPTY tokenizer.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads, and two-rank runs on two cores oversubscribe badly with them.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = str(ROOT / "tests" / "plugin_rewards.py")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from testing.images import write_image_folder  # noqa: E402,F401  (tests import it from here)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    from sharpening.tiny import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> Path:
    from sharpening.tiny import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    from sharpening.tiny import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("tiny-flux"))


def reset_accelerate_state() -> None:
    """Each in-process run builds its own Accelerator: forget accelerate's process-wide singletons."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate_state():
    """After an in-process run: reset accelerate's singletons and restore the SIGTERM handler the Trainer replaced."""
    previous = signal.getsignal(signal.SIGTERM)
    yield
    reset_accelerate_state()
    signal.signal(signal.SIGTERM, previous)


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return write_image_folder(tmp_path / "data")


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (the folder is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_args(model: Path, output_dir: Path, **overrides) -> list[str]:
    """Flags for a fast run of either script on the tiny SDXL (32 px -> 16x16 latents, 4-step grid)."""
    flags = {
        "pretrained_model_name_or_path": model,
        "output_dir": output_dir,
        "resolution": 32,
        "train_batch_size": 2,
        "max_train_steps": 2,
        "num_noisy_latents": 3,
        "trajectory_nums": 2,
        "infer_steps": 4,
        "learning_rate": 1e-3,
        "checkpointing_steps": 1000,
        "seed": 0,
        "reward_model": "brightness",
        "reward_plugin": PLUGIN,
        "report_to": "none",
        "guidance_scale": 2.0,
    }
    flags.update(overrides)
    argv = []
    for key, value in flags.items():
        if value is None:
            continue
        if value is True:
            argv.append(f"--{key}")
        else:
            argv += [f"--{key}", str(value)]
    return argv


def accelerate_launch(script: str, argv: list[str], num_processes: int = 1, timeout: int = 600, env_extra=None) -> subprocess.CompletedProcess:
    """Run a training script the way users do. Two processes use gloo on CPU (`--cpu` would run only one)."""
    cmd, env = launch_command(script, argv, num_processes, env_extra)
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        print(result.stdout[-5000:], result.stderr[-10000:], sep="\n")
    return result


def launch_command(script: str, argv: list[str], num_processes: int = 1, env_extra=None) -> tuple[list[str], dict]:
    """The `accelerate launch` command line and environment of `accelerate_launch`."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), **(env_extra or {}))
    if num_processes > 1:
        launcher += ["--multi_gpu", "--num_processes", str(num_processes), "--main_process_port", str(_free_port())]
        env["ACCELERATE_USE_CPU"] = "true"
    else:
        launcher += ["--num_processes", "1"]
    return launcher + [str(ROOT / script)] + argv, env


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
