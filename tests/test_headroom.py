"""benchmarks/headroom.py: the best-of-j expectation is exact (equals enumerating every j-subset), ties are counted,
and the benchmark runs end to end on the tiny twin."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from conftest import load_benchmark


@pytest.fixture(scope="module")
def headroom():
    return load_benchmark("headroom")


def test_expected_best_of_equals_enumerating_subsets(headroom):
    values = np.array([0.3, -1.0, 2.5, 0.3, 7.0, 0.0])
    for j in range(1, len(values) + 1):
        brute = np.mean([max(s) for s in itertools.combinations(values, j)])
        assert headroom.expected_best_of(values, j) == pytest.approx(brute, abs=1e-12)
    assert headroom.expected_best_of(values, 1) == pytest.approx(values.mean())


def test_headroom_by_hand(headroom):
    # prompt 1: [0, 1, 1, 2] -> mean 1, best of 2 = (1+1+2+1+2+2)/6 = 1.5, one tied pair of six
    # prompt 2: [5, 5, 5, 5] -> mean 5, no gain, every pair tied; prompt 3 has a NaN and is dropped
    scores = np.array([0, 1, 1, 2, 5, 5, 5, 5, 3, np.nan, 3, 3], dtype=float)
    row = headroom.headroom(scores, 4)
    assert row["prompts"] == 2 and row["prompts_dropped"] == 1
    assert row["mean"] == pytest.approx(3.0)
    assert row["best_of"][2]["gain"] == pytest.approx(0.25)
    assert row["best_of"][4]["gain"] == pytest.approx(0.5)
    assert row["tied_pairs"] == pytest.approx((1 / 6 + 1) / 2)
    # variances 2/3 and 0 -> within 1/3; prompt means 1 and 5 (variance 8) carry 1/3 / 4 of it as noise
    assert row["within_prompt_sd"] == pytest.approx((1 / 3) ** 0.5)
    assert row["between_prompt_sd"] == pytest.approx((8 - 1 / 12) ** 0.5)


def test_relation_against_chance_reads_only_images_with_both_objects(headroom):
    """Only images whose objects are both found (toy/objects >= 0.9) count; missing scores are skipped; the SE is over
    prompts (2 images each here), not over images."""
    row = headroom.relation_against_chance({"toy/objects": [1.0, 0.95, 0.5, None, 0.9, 1.0],
                                            "toy/relation": [1.0, 0.0, 0.9, None, float("nan"), 1.0]}, 2)
    assert row["objects_found_images"] == 3 and row["objects_found_prompts"] == 2
    assert row["objects_found_mean"] == pytest.approx(2 / 3)
    # Prompt sums 1 and 1 over counts 2 and 1: residuals 1 - 4/3 and 1 - 2/3; sqrt(2 * (1/9 + 1/9)) / 3.
    assert row["objects_found_se"] == pytest.approx(math.sqrt(2 * 2 / 9) / 3)
    assert row["by_chance"] == pytest.approx(0.407, abs=0.01)
    # Identical prompts: the image-level SE would be small, the prompt-level one says there are only two prompts.
    clustered = headroom.relation_against_chance({"toy/objects": [1.0] * 8, "toy/relation": [1, 1, 1, 1, 0, 0, 0, 0]}, 4)
    assert clustered["objects_found_se"] == pytest.approx(0.5)


def test_headroom_runs_on_the_tiny_twin(headroom, tiny_sdxl, tmp_path):
    rows = headroom.main(headroom.parse_args(["--model", str(tiny_sdxl), "--num_prompts", "3", "--images_per_prompt", "3", "--steps", "2",
                                              "--rewards", "toy", "brightness", "--output_dir", str(tmp_path)]))
    assert set(rows) >= {"toy", "brightness", "toy/objects", "toy/relation"}
    assert rows["brightness"]["prompts"] == 3 and rows["brightness"]["best_of"][3]["gain"] > 0
    written = json.loads((tmp_path / "headroom.json").read_text())
    assert written["rows"]["brightness"]["mean"] == pytest.approx(rows["brightness"]["mean"])
    assert "best-of-3 gain" in (tmp_path / "headroom.md").read_text()
    assert written["rows"]["toy/relation"]["by_chance"] == pytest.approx(0.407, abs=0.01)
    assert 0 <= written["rows"]["toy/relation"]["objects_found_images"] <= 9
    assert "placed at random, ignoring the caption: 0.40" in (tmp_path / "headroom.md").read_text()


def test_headroom_needs_two_images_per_prompt(headroom):
    with pytest.raises(SystemExit):
        headroom.parse_args(["--images_per_prompt", "1"])
