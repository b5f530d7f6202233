"""What a run shows in wandb and TensorBoard, through accelerate's trackers (one call path for both): the
trajectory grid of a step (which candidate won, and on which previews), reward histograms, validation images."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from .trajectory import Candidates

WINNER, LOSER = (30, 160, 60), (200, 40, 40)


def trajectory_grid(candidates: Candidates, prompt: int, cell: int = 96) -> Image.Image:
    """One prompt's exploration: a row per candidate (its m x0 previews left to right, each with its step reward, or
    with --path_reward final its finished image; the path reward at the row's start), the winner framed green and
    the loser red."""
    exploration = candidates.exploration
    m, rows = exploration.step_rewards.shape
    n = rows // candidates.selection.winner.shape[0]
    label_w, label_h = 110, 14
    grid = Image.new("RGB", (label_w + m * cell, label_h + n * (cell + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    for k in range(m):
        draw.text((label_w + k * cell + 2, 1), "finished" if exploration.finished is not None else f"state {k + 1}", fill="black")
    winner, loser = int(candidates.selection.winner[prompt]), int(candidates.selection.loser[prompt])
    for i in range(n):
        row = i * candidates.selection.winner.shape[0] + prompt
        top = label_h + i * (cell + label_h)
        # Marked only where the prompt trains: with all candidates tied or unscored, candidate 0 is no winner.
        sel = candidates.selection
        mark = " (winner)" if i == winner and sel.sft_trains[prompt] else " (loser)" if i == loser and sel.has_pair[prompt] else ""
        draw.text((2, top + 2), f"candidate {i}{mark}\npath {float(candidates.path_rewards[row]):.4g}\nt = {int(exploration.timesteps[0, row])}", fill="black")
        for k in range(m):
            image = exploration.images[k * rows + row].convert("RGB").resize((cell, cell), Image.Resampling.NEAREST)
            grid.paste(image, (label_w + k * cell, top))
            draw.text((label_w + k * cell + 2, top + cell + 1), f"{float(exploration.step_rewards[k, row]):.4g}", fill="black")
        if mark:
            colour = WINNER if i == winner else LOSER
            draw.rectangle((label_w, top, label_w + m * cell - 1, top + cell - 1), outline=colour, width=3)
    return grid


def log_images(accelerator, name: str, images: list[Image.Image], captions: list[str], step: int) -> None:
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            for i, image in enumerate(images):
                tracker.writer.add_image(f"{name}/{i}", np.asarray(image.convert("RGB")), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({name: [wandb.Image(image, caption=caption) for image, caption in zip(images, captions)]}, step=step)


def log_histograms(accelerator, values: dict[str, torch.Tensor], step: int) -> None:
    """One histogram per name, of the finite values."""
    for tracker in accelerator.trackers:
        for name, tensor in values.items():
            finite = tensor[torch.isfinite(tensor)].double().cpu().numpy()
            if not len(finite):
                continue
            if tracker.name == "tensorboard":
                tracker.writer.add_histogram(name, finite, step)
            elif tracker.name == "wandb":
                import wandb

                tracker.log({name: wandb.Histogram(finite)}, step=step)


def log_trajectories(accelerator, candidates: Candidates, prompts: list[str], step: int, max_prompts: int) -> None:
    """The grids of the first `max_prompts` prompts of a step, and histograms of every reward component."""
    shown = range(min(max_prompts, len(prompts)))
    log_images(accelerator, "trajectories", [trajectory_grid(candidates, b) for b in shown],
               [_caption(prompts[b], candidates, b) for b in shown], step)
    histograms = {"reward_histogram/path": candidates.path_rewards}
    histograms |= {f"reward_histogram/{name}": values.flatten() for name, values in candidates.exploration.step_components.items()}
    log_histograms(accelerator, histograms, step)


def _caption(prompt: str, candidates: Candidates, b: int) -> str:
    sel = candidates.selection
    if not sel.sft_trains[b]:  # tied or unscored: the step skips this prompt
        return f"{prompt} | no preference (not trained)"
    gap = float(sel.winner_reward[b] - sel.loser_reward[b])
    return f"{prompt} | winner {int(sel.winner[b])}, loser {int(sel.loser[b])}, gap {gap:.4g}"
