"""The reward registry: name -> factory, the reward's own flags and checks; `--reward_model` specs; the shared
reward flags; `build_reward`. A reward module registers itself on import (`@register_reward`); importing this
module alone registers no reward (`import reward` registers every built-in)."""
from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .base import Reward, WeightedSumReward


# ============================================================================================= registry
RewardFactory = Callable[[argparse.Namespace, torch.device, torch.dtype], Reward]
FlagsHook = Callable[[argparse._ArgumentGroup], None]
ValidateHook = Callable[[argparse.Namespace], None]
REWARDS: dict[str, RewardFactory] = {}
REWARD_FLAGS: dict[str, FlagsHook] = {}  # name -> adds that reward's own flags to its argument group
REWARD_VALIDATORS: dict[str, ValidateHook] = {}  # name -> checks its flags before any model is loaded
REWARD_BORROWED_FLAGS: dict[str, tuple[str, ...]] = {}  # name -> flags of other rewards it reads too
_registrations = 0  # register_reward calls so far: a plugin file that makes none is refused


def register_reward(name: str, *, flags: FlagsHook | None = None, validate: ValidateHook | None = None,
                    borrows: tuple[str, ...] = ()) -> Callable[[RewardFactory], RewardFactory]:
    """Decorator: `@register_reward("toy", flags=add_toy_flags, validate=check) def build(args, device, dtype)`.

    `flags(group)` adds the reward's own command-line flags (every script that takes reward flags shows them,
    including those of a `--reward_plugin` file); `validate(args)` runs when the reward is selected, before
    any model is loaded; `borrows` names flags of other rewards that this one reads as well (their values then
    count as used when only this reward is selected). Re-registering a name is allowed only for the same function
    (a plugin file imported twice); anything else would silently replace a reward, so it raises.
    """
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", name):
        raise ValueError(f"reward name {name!r} must be letters, digits, '_' or '-' (it appears in --reward_model).")

    def decorator(factory: RewardFactory) -> RewardFactory:
        global _registrations
        _registrations += 1
        existing = REWARDS.get(name)
        if existing is not None and _qualname(existing) != _qualname(factory):
            raise ValueError(f"reward {name!r} is already registered by {_qualname(existing)}.")
        REWARDS[name] = factory
        if flags is not None:
            REWARD_FLAGS[name] = flags
        if validate is not None:
            REWARD_VALIDATORS[name] = validate
        if borrows:
            REWARD_BORROWED_FLAGS[name] = tuple(borrows)
        return factory

    return decorator


class RewardPluginError(ValueError):
    """A --reward_plugin path that is no file, or a file that registers no reward: a usage error. (An exception the
    file's own code raises keeps its traceback.)"""


def load_reward_plugins(paths: Sequence[str] | None) -> None:
    """Import each `--reward_plugin` file; it registers its rewards (and their flags) with `register_reward`."""
    import hashlib
    import importlib.util

    for path in paths or []:
        file = Path(path)
        if not file.is_file():
            raise RewardPluginError(f"--reward_plugin {path!r}: no such file.")
        name = "reward_plugin_" + hashlib.sha1(str(file.resolve()).encode()).hexdigest()[:12]
        # Imported again on every call (registering the same functions again is allowed), so a registry
        # that was reset still gets the plugin's rewards.
        spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        before = _registrations
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        if _registrations == before:
            # otherwise the run would only say later that the reward it names is unknown, not which file is wrong
            raise RewardPluginError(f"--reward_plugin {path!r} registered no reward: decorate its builder with "
                                    "@register_reward(\"name\") (from reward import register_reward) and pass --reward_model name.")


def register_lazy_reward(name: str, target: str, *, flags: FlagsHook | None = None,
                         validate: ValidateHook | None = None) -> None:
    """Register a reward whose factory `module:function` is imported only when the reward is built, so registering
    it imports nothing, and that module may import this package back (toyworld.reward subclasses `Reward`)."""
    module_name, _, function = target.partition(":")

    def build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Reward:
        import importlib

        return getattr(importlib.import_module(module_name), function)(args, device, dtype)

    build.__qualname__ = f"lazy[{target}]"
    register_reward(name, flags=flags, validate=validate)(build)


def _qualname(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def parse_reward_spec(spec: str) -> list[tuple[str, float]]:
    """'clip' -> [('clip', 1.0)]; 'clip:1.0,image_reward:0.5' -> two entries. Loads no model."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"--reward_model is empty; valid names: {', '.join(sorted(REWARDS))}.")
    entries: list[tuple[str, float]] = []
    for part in spec.split(","):
        name, weight = _parse_spec_entry(part.strip(), spec)
        if name in (n for n, _ in entries):
            raise ValueError(f"--reward_model {spec!r} names {name!r} twice; give each reward once with its weight.")
        entries.append((name, weight))
    return entries


def _parse_spec_entry(part: str, spec: str) -> tuple[str, float]:
    if not part:
        raise ValueError(f"--reward_model {spec!r} has an empty entry; use 'name' or 'name:weight' separated by ','.")
    name, sep, weight_text = part.partition(":")
    name = name.strip()
    if name not in REWARDS:
        raise ValueError(f"--reward_model {spec!r}: unknown reward {name!r}; "
                         f"valid names: {', '.join(sorted(REWARDS))}.")
    if not sep:
        return name, 1.0
    try:
        if "_" in weight_text:  # float() reads "1_0" as 10
            raise ValueError
        weight = float(weight_text)
    except ValueError:
        raise ValueError(f"--reward_model {spec!r}: weight {weight_text!r} of {name!r} is not a number.") from None
    if not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"--reward_model {spec!r}: weight of {name!r} must be a finite number > 0, "
                         f"got {weight_text!r}.")
    return name, weight


# ================================================================================================ flags
def add_reward_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> None:
    """The reward flags: the shared ones, then each registered reward's own group. `--reward_plugin` files named
    in `argv` (default: sys.argv) are imported first, so their flags are part of the parser too."""
    g = parser.add_argument_group("reward model")
    g.add_argument("--reward_model", default="clip",
                   help="The reward (trained toward, or scored): one of " + ", ".join(sorted(REWARDS)) + " (or a reward registered by "
                        "--reward_plugin), or a weighted sum such as 'clip:1.0,image_reward:0.5' (components are "
                        "reported separately).")
    g.add_argument("--reward_batch_size", type=int, default=32,
                   help="Images per forward pass of the local reward models (clip, pickscore, hpsv2, aesthetic, "
                        "image_reward, compositional).")
    g.add_argument("--reward_plugin", action="append", default=[], metavar="FILE.py",
                   help="A Python file that registers extra rewards with reward.register_reward (and may add their "
                        "flags); repeatable.")
    try:
        load_reward_plugins(_plugin_paths(sys.argv[1:] if argv is None else argv))
    except RewardPluginError as error:
        parser.error(str(error))
    for name, add_flags in REWARD_FLAGS.items():
        add_flags(parser.add_argument_group(f"reward: {name}"))


def _plugin_paths(argv: Sequence[str]) -> list[str]:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--reward_plugin", action="append", default=[])
    return pre.parse_known_args(list(argv))[0].reward_plugin


def _reward_defaults() -> dict[str, Any]:
    """Every reward flag at its default, including those of rewards registered since the last call."""
    parser = argparse.ArgumentParser(add_help=False)
    add_reward_args(parser, argv=[])
    return vars(parser.parse_args([]))


def _complete_args(args: argparse.Namespace | None) -> argparse.Namespace:
    """The given flags over the reward defaults, so callers may pass a partial Namespace."""
    merged = _reward_defaults()
    merged.update(vars(args) if args is not None else {})
    return argparse.Namespace(**merged)


def validate_reward_args(args: argparse.Namespace) -> None:
    """Checks that need no model: the spec, numeric ranges, and what each selected reward needs."""
    args = _complete_args(args)
    names = [name for name, _ in parse_reward_spec(args.reward_model)]
    if args.reward_batch_size < 1:
        raise ValueError("--reward_batch_size must be >= 1.")
    for name in names:
        if name in REWARD_VALIDATORS:
            REWARD_VALIDATORS[name](args)


def _own_flags(name: str) -> list[str]:
    """The destinations of the flags reward `name` adds to the parser."""
    parser = argparse.ArgumentParser(add_help=False)
    REWARD_FLAGS[name](parser.add_argument_group(name))
    return [action.dest for action in parser._actions]


def check_reward_flags_used(args: argparse.Namespace, specs: Sequence[str]) -> None:
    """Refuse a reward's own flag set to other than its default when no reward in `specs` (the run's --reward_model,
    and evaluate's --also_score) reads it: `--reward_model clip --api_key KEY` would otherwise run CLIP and drop the
    key without a word, and a model path given for a reward that is not selected is almost always a typo in the spec."""
    selected = {name for spec in specs for name, _ in parse_reward_spec(spec)}
    own = {name: _own_flags(name) for name in REWARD_FLAGS}
    read = {flag for name in selected for flag in (*own.get(name, ()), *REWARD_BORROWED_FLAGS.get(name, ()))}
    defaults = _reward_defaults()
    unused = {f"--{flag}": name for name, flags in own.items() for flag in flags
              if flag not in read and getattr(args, flag, defaults[flag]) != defaults[flag]}
    if unused:
        owners, several = sorted(set(unused.values())), len(unused) > 1
        raise ValueError(
            f"{', '.join(unused)} {'are flags' if several else 'is a flag'} of the {' and '.join(owners)} reward"
            f"{'s' if len(owners) > 1 else ''}, and no selected reward ({', '.join(sorted(selected))}) uses "
            f"{'them' if several else 'it'}: add {' and '.join(owners)} to --reward_model (a weighted sum such as "
            f"{specs[0]},{owners[0]}:1.0) or drop the flag{'s' if several else ''}.")


def build_reward(spec: str, args: argparse.Namespace | None, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> Reward:
    """Load every reward in `spec` once; a weighted sum when there are several or a weight != 1."""
    args = _complete_args(args)
    entries = parse_reward_spec(spec)
    validate_reward_args(argparse.Namespace(**{**vars(args), "reward_model": spec}))
    device = torch.device(device)
    parts = [(REWARDS[name](args, device, dtype), weight) for name, weight in entries]
    for (name, _), (built, _) in zip(entries, parts):
        if not isinstance(built, Reward):  # else it fails at the first training step, after the models have loaded
            raise TypeError(f"reward {name!r}: its builder returned {type(built).__name__}; a reward builder must return a "
                            "rewards.base.Reward, whose evaluate(images, prompts) gives a RewardOutput (total: one score per image).")
        if built.name == Reward.name:  # a class that names nothing: logs and error messages use the registered name
            built.name = name
    if len(parts) == 1 and parts[0][1] == 1.0:
        return parts[0][0]
    return WeightedSumReward(parts)
