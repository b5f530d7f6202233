"""`--reward_plugin FILE.py`: register your own rewards without editing reward.py.

The file is imported before the reward spec is checked; it registers factories with
`reward.register_reward("name")`, and `--reward_model name` (or a weighted mix) then uses them.
"""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path


def load_reward_plugins(paths: list[str] | None) -> None:
    for path in paths or []:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"--reward_plugin {path!r} does not exist.")
        name = "reward_plugin_" + hashlib.sha1(str(file.resolve()).encode()).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
