"""The scripts/ launchers, run with a stand-in `accelerate` that records its arguments: paths the caller gives relative
to where they ran the script stay so after the script changes to the repository root, and an empty flag array (no
xformers) expands to nothing under `set -u`."""
from __future__ import annotations

import os
import subprocess

import pytest

from conftest import ROOT


def launch(script: str, tmp_path, **env) -> list[str]:
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    (stubs / "accelerate").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$RECORD"\n')
    (stubs / "python").write_text("#!/usr/bin/env bash\nexit 1\n")  # no xformers here
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    caller = tmp_path / "caller"
    caller.mkdir(exist_ok=True)
    record = tmp_path / "args.txt"
    environment = {"PATH": f"{stubs}:/usr/bin:/bin", "HOME": str(tmp_path), "RECORD": str(record), **env}
    subprocess.run(["bash", str(ROOT / "scripts" / script)], cwd=caller, env=environment, check=True, timeout=60)
    return record.read_text().splitlines()


@pytest.mark.parametrize("script", ["rlhf.sh", "sd3_rlhf.sh", "flux_rlhf.sh"])
def test_rlhf_launchers_keep_the_callers_relative_paths(script, tmp_path):
    args = launch(script, tmp_path, PROMPT_FILE="prompts.txt", OUTPUT_DIR="runs/x")
    assert f"--prompt_file={tmp_path}/caller/prompts.txt" in args
    assert f"--output_dir={tmp_path}/caller/runs/x" in args
    assert "" not in args and not any("xformers" in a for a in args)


@pytest.mark.parametrize("script, default", [("sft.sh", "output_dir/sft"), ("sd3_sft.sh", "output_dir/sd3_sft"),
                                             ("flux_sft.sh", "output_dir/flux_sft")])
def test_sft_launchers_keep_a_local_dataset_and_default_to_the_repository(script, default, tmp_path):
    (tmp_path / "caller" / "data").mkdir(parents=True)
    args = launch(script, tmp_path, DATASET_NAME="data")
    assert f"--dataset_name={tmp_path}/caller/data" in args
    output = next(a.split("=", 1)[1] for a in args if a.startswith("--output_dir="))
    assert os.path.realpath(ROOT / output) == os.path.realpath(ROOT / default)  # relative to the repository root, or absolute there
    # A hub id is not a local path: passed as it is.
    assert "--dataset_name=lambdalabs/naruto-blip-captions" in launch(script, tmp_path, DATASET_NAME="lambdalabs/naruto-blip-captions")
