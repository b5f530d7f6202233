"""The reward interface (`Reward`, `RewardOutput`), credentials (`Secret`), the batch helpers every reward
uses, and `WeightedSumReward`, the mix `build_reward` returns for a spec such as 'clip:1.0,image_reward:0.5'."""
from __future__ import annotations

import abc
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from PIL import Image


# Flags that hold credentials: never log them, never put them in tracker configs or model cards.
SECRET_ARG_NAMES = ("api_key",)


# ============================================================================================ interface
@dataclass
class RewardOutput:
    """Scores for a batch. `total` is what training optimises; `components` are logged separately."""

    total: torch.Tensor  # float32, CPU, shape [N]; NaN where no score could be had
    components: dict[str, torch.Tensor] = field(default_factory=dict)  # unweighted scores, same shape (may be empty)


class Reward(abc.ABC):
    """A reward model: images + prompts in, one score per image out. Built once by a factory."""

    name: str = "reward"
    # Remote graders spend their time waiting on the network; a weighted mix runs them in a thread
    # while the local models compute.
    io_bound: bool = False

    @abc.abstractmethod
    def evaluate(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> RewardOutput:
        """Score image i against prompt i. All images of a training step arrive in one call."""

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        return self.evaluate(images, prompts).total

    def counters(self) -> dict[str, int]:
        """Cumulative event counts for logging, e.g. {"mllm/failures": 3}."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class Secret:
    """A credential whose str/repr never shows it, so printing the parsed args or a reward cannot leak it.

    Pickling keeps no value (a checkpoint that pickles the args must not contain the key); copies share it.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __copy__(self) -> Secret:
        return self

    def __deepcopy__(self, memo: dict) -> Secret:
        return self

    def __reduce__(self) -> tuple:
        return (Secret, ("",))


# ============================================================================================== helpers
def check_batch(images: Sequence[Image.Image], prompts: Sequence[str]) -> None:
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; pass one prompt per image.")
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        if not isinstance(image, Image.Image):
            raise TypeError(f"images[{i}] is a {type(image).__name__}, expected a PIL.Image.Image.")
        if not isinstance(prompt, str):
            raise TypeError(f"prompts[{i}] is a {type(prompt).__name__}, expected a str.")


def chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def to_scores(values: torch.Tensor) -> torch.Tensor:
    """float32 CPU vector; infinities (e.g. an fp16 overflow) are not scores, so they become NaN."""
    values = values.detach().to(device="cpu", dtype=torch.float32).reshape(-1)
    return torch.where(torch.isfinite(values), values, torch.full_like(values, float("nan")))


def to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


# OpenAI CLIP's pixel normalisation, used by the HPS and ImageReward image transforms.
CLIP_PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)


class ChunkedReward(Reward):
    """A local model that scores `batch_size` images per forward pass: subclasses implement `score_chunk`. Scores
    come back as float32 on the CPU; non-finite ones (e.g. an fp16 overflow) become NaN and are counted in
    `<name>/nonfinite`."""

    def __init__(self, device: torch.device, dtype: torch.dtype, batch_size: int) -> None:
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        self._nonfinite = 0

    @abc.abstractmethod
    def score_chunk(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """One score per image of the chunk."""

    @torch.no_grad()
    def evaluate(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> RewardOutput:
        check_batch(images, prompts)
        scores = [self.score_chunk(images[s], prompts[s]) for s in chunks(len(images), self.batch_size)]
        total = to_scores(torch.cat(scores)) if scores else torch.zeros(0)
        self._nonfinite += int(torch.isnan(total).sum())
        return RewardOutput(total=total, components={self.name: total})

    def counters(self) -> dict[str, int]:
        return {f"{self.name}/nonfinite": self._nonfinite} if self._nonfinite else {}


def checked_evaluate(reward: Reward, images: Sequence[Image.Image], prompts: Sequence[str]) -> RewardOutput:
    """reward.evaluate, with its output checked: a RewardOutput whose total and components hold one score per image.
    Every caller scores through this, so a plugin's wrong shape fails with the reward's name instead of broadcasting
    (a (1,) total would become one score for every image, a (N, 1) one an N x N table)."""
    out = reward.evaluate(images, prompts)
    if not isinstance(out, RewardOutput):
        raise TypeError(f"reward {reward.name!r} returned {type(out).__name__}; evaluate() must return a rewards.base.RewardOutput.")
    for key, values in {"total": out.total, **out.components}.items():
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        if shape != (len(images),):
            raise ValueError(f"reward {reward.name!r} returned {key} of shape {shape} for {len(images)} images; a reward gives "
                             f"one score per image: a tensor of shape ({len(images)},).")
    return out


# ========================================================================================= weighted sum
class WeightedSumReward(Reward):
    """total = sum_i w_i * c_i (a NaN in any component makes the total NaN: no made-up score)."""

    def __init__(self, parts: list[tuple[Reward, float]]) -> None:
        names = [reward.name for reward, _ in parts]
        if len(set(names)) != len(names):
            raise ValueError(f"reward names must be unique in a mix, got {names}.")
        self.parts = parts
        self.name = ",".join(f"{reward.name}:{weight:g}" for reward, weight in parts)

    def evaluate(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> RewardOutput:
        check_batch(images, prompts)
        outputs = self._evaluate_parts(list(images), list(prompts))
        total = torch.zeros(len(images), dtype=torch.float32)
        components: dict[str, torch.Tensor] = {}
        for reward, weight in self.parts:
            out = outputs[reward.name]
            total = total + weight * out.total.to(device="cpu", dtype=torch.float32)
            # Each part's own score, unweighted, beside its sub-scores: a reward that reports only sub-scores
            # (toy: objects, relation, clean) would otherwise vanish from a mix's logs and evaluation tables.
            components[reward.name] = out.total
            components.update(out.components)
        return RewardOutput(total=total, components=components)

    def _evaluate_parts(self, images: list[Image.Image], prompts: list[str]) -> dict[str, RewardOutput]:
        remote = [reward for reward, _ in self.parts if reward.io_bound]
        local = [reward for reward, _ in self.parts if not reward.io_bound]
        outputs: dict[str, RewardOutput] = {}
        if not remote:
            return {reward.name: checked_evaluate(reward, images, prompts) for reward in local}
        with ThreadPoolExecutor(max_workers=len(remote), thread_name_prefix="reward-remote") as pool:
            futures = {reward.name: pool.submit(checked_evaluate, reward, images, prompts) for reward in remote}
            for reward in local:
                outputs[reward.name] = checked_evaluate(reward, images, prompts)
            for name, future in futures.items():
                outputs[name] = future.result()
        return outputs

    def counters(self) -> dict[str, int]:
        merged: dict[str, int] = {}
        for reward, _ in self.parts:
            merged.update(reward.counters())
        return merged

    def __repr__(self) -> str:
        return f"WeightedSumReward({', '.join(f'{r!r} * {w:g}' for r, w in self.parts)})"
