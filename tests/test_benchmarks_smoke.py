"""benchmarks/step_cost.py runs end to end on the tiny SDXL and counts what each side really does."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, load_benchmark, write_image_folder
from toyworld import world


def test_step_cost_counts_ours_and_the_upstream_baseline(tiny_sdxl, tmp_path):
    n, m, b, grid = 2, 2, 2, 4
    out = tmp_path / "cost.json"
    load_benchmark("step_cost").main([
        "--model_path", str(tiny_sdxl), "--variant", "both", "--n", str(n), "--m", str(m), "--batch_size", str(b),
        "--infer_steps", str(grid), "--steps", "1", "--warmup", "0", "--json", str(out),
    ])
    results = json.loads(out.read_text())["results"]
    sft, rlhf = results["sft"], results["rlhf"]

    # SFT: ours explores n*B candidates for m steps without grad and (the default --path_reward final) continues the
    # paths still on the grid to its end (at least the n of the prompt that started first in every further call),
    # scores the n*B finished images in one call, then one grad call on the n*m*B explored states (the default
    # target regresses every candidate's states onto the best path's end image).
    assert (sft["ours"]["unet_grad_calls"], sft["ours"]["unet_grad_rows"]) == (1, n * m * b)
    calls, rows = sft["ours"]["unet_nograd_calls"], sft["ours"]["unet_nograd_rows"]
    assert m <= calls <= grid and m * n * b + (calls - m) * n <= rows <= calls * n * b
    assert (sft["ours"]["reward_calls"], sft["ours"]["reward_images"]) == (1, n * b)
    assert sft["ours"]["vae_decode_images_with_graph"] == 0
    # The upstream way: everything with grad, decodes with a graph, one reward call per image.
    assert (sft["baseline"]["unet_grad_calls"], sft["baseline"]["unet_grad_rows"]) == (m, n * m * b)
    assert sft["baseline"]["unet_nograd_rows"] == 0
    assert (sft["baseline"]["reward_calls"], sft["baseline"]["reward_images"]) == (n * m * b, n * m * b)
    assert sft["baseline"]["vae_decode_images_with_graph"] == n * m * b

    # RLHF: ours = CFG rollout (2B rows per grid step) + exploration + reference; the default target puts winner and
    # loser on the SAME n*m*B explored states, so one grad call and one reference call over them serve both.
    assert (rlhf["ours"]["unet_grad_calls"], rlhf["ours"]["unet_grad_rows"]) == (1, n * m * b)
    assert rlhf["ours"]["unet_nograd_rows"] == grid * 2 * b + n * m * b + n * m * b
    # Upstream: n*B rollouts without CFG, reference once at the first state, every candidate with grad.
    assert rlhf["baseline"]["unet_grad_rows"] == n * m * b
    assert rlhf["baseline"]["unet_nograd_rows"] == grid * n * b + n * b

    for res in (sft, rlhf):
        for impl in ("ours", "baseline"):
            assert res[impl]["time_s"] > 0 and res[impl]["peak_growth_mb"] > 0
            assert res[impl]["outcomes"] == ["updated"]
        assert res["ratios"]["unet_grad_rows"] is not None and res["ratios"]["time"] is not None


def test_quality_benchmark_runs_its_variants_with_overrides(tiny_sdxl, tmp_path):
    """benchmarks/quality.py end to end on the tiny SDXL (2 variants, 1 step each): --set reaches the
    training command lines (all variants, or one; on/off flags too), every checkpoint (full or LoRA) is evaluated, both
    splits write their files."""
    quality = load_benchmark("quality")
    work = tmp_path / "q"
    common = ["--model", str(tiny_sdxl), "--work_dir", str(work), "--steps", "2", "--eval_every", "1", "--train_images", "4",
              "--eval_prompts", "2", "--images_per_prompt", "1", "--eval_steps", "2", "--threads", "1",
              "--only", "standard-ft", "rlhf-sharpening", "--set", "rlhf-sharpening:use_lora=true"]
    own = write_image_folder(tmp_path / "own", count=4)
    trained = common + ["--set", "train_batch_size=2", "--set", "rlhf-sharpening:dpo_target=endpoint", "--set", f"standard-ft:train_data_dir={own}"]
    quality.main(quality.parse_args(trained))
    sft_cmd = (work / "standard-ft.log").read_text().splitlines()[0]
    rlhf_cmd = (work / "rlhf-sharpening.log").read_text().splitlines()[0]
    assert "--train_batch_size 2" in sft_cmd and "--train_batch_size 2" in rlhf_cmd
    assert f"--train_data_dir {own}" in sft_cmd  # --set may name other data (it was overwritten by the toy data)
    assert "--dpo_target endpoint" in rlhf_cmd and "dpo_target" not in sft_cmd
    assert "--use_lora" in rlhf_cmd and "--use_lora" not in sft_cmd
    record = json.loads((work / "quality.json").read_text())
    assert set(record["summary"]) == {"base", "standard-ft@1", "standard-ft@2", "rlhf-sharpening@1", "rlhf-sharpening@2"}
    assert record["overrides"] == ["rlhf-sharpening:use_lora=true", "train_batch_size=2", "rlhf-sharpening:dpo_target=endpoint",
                                   f"standard-ft:train_data_dir={own}"]
    assert "| standard-ft |" in (work / "quality.md").read_text()

    assert "batch 2 for every fine-tune" in (work / "quality.md").read_text()  # the runs' batch, not the recipe's 8

    # The diagnostic split re-evaluates the same checkpoints on training prompts, beside the held-out files; only
    # with the flags they were trained with (without the --set values it would report them as if trained so).
    with pytest.raises(SystemExit, match=r"--skip_training: .*standard-ft was trained with other flags \(.*train_batch_size: '2' then, 8 now"):
        quality.main(quality.parse_args(common + ["--skip_training", "--eval_split", "train_pairs"]))
    quality.main(quality.parse_args(trained + ["--skip_training", "--eval_split", "train_pairs"]))
    assert "TRAIN prompts" in (work / "quality_train_pairs.md").read_text()
    assert (work / "eval_train_pairs" / "results.json").is_file() and (work / "eval" / "results.json").is_file()


def test_quality_benchmark_refuses_overrides_for_unknown_variants(tmp_path):
    quality = load_benchmark("quality")
    with pytest.raises(SystemExit, match="unknown variants"):
        quality.main(quality.parse_args(["--work_dir", str(tmp_path), "--steps", "2", "--eval_every", "1",
                                         "--set", "rlhf:beta_dpo=100"]))
    with pytest.raises(SystemExit, match="VARIANT"):
        quality.overrides_for("rlhf-sharpening", ["beta_dpo"])
    # A value may hold colons (a weighted reward mix): only a ':' before the first '=' names a variant.
    mix = "reward_model=toy:1.0,brightness:0.5"
    assert quality.overrides_for("rlhf-sharpening", [mix]) == {"reward_model": "toy:1.0,brightness:0.5"}
    assert quality.overrides_for("rlhf-sharpening", [f"rlhf-sharpening:{mix}"]) == {"reward_model": "toy:1.0,brightness:0.5"}
    assert quality.overrides_for("sft-sharpening", [f"rlhf-sharpening:{mix}"]) == {}


def test_benchmark_options_that_would_mislabel_a_run_or_leak_a_key_are_refused(tmp_path):
    quality, response = load_benchmark("quality"), load_benchmark("reward_response")
    for item, message in (("max_train_steps=120", "sets --max_train_steps itself; use its --steps"),
                          ("rlhf-sharpening:output_dir=x", "sets --output_dir itself; use its --work_dir"),
                          ("api_key=sk-123", "would be written to the logs")):
        with pytest.raises(SystemExit, match=message):
            quality.overrides_for("rlhf-sharpening", [item])
    with pytest.raises(SystemExit, match="sets --pretrained_model_name_or_path itself"):
        response.parse_args(["--variant", "mine=sft:pretrained_model_name_or_path=other"])
    with pytest.raises(SystemExit):  # the reward of a run is --rewards'; the report would name the wrong one
        response.parse_args(["--rewards", "toy", "--set", "reward_model=brightness"])
    with pytest.raises(SystemExit, match="a weighted mix is not one of them"):  # its ',' broke evaluate's model specs after training
        response.parse_args(["--rewards", "brightness:1.0,saturation:1.0"])
    with pytest.raises(SystemExit, match="a ',' in a path"):
        response.parse_args(["--rewards", "toy", "--work_dir", str(tmp_path / "a,b")])


def test_reward_response_benchmark_end_to_end(tiny_sdxl, tmp_path):
    """benchmarks/reward_response.py on the tiny SDXL: two rewards x (one built-in variant with EMA + one LoRA
    --variant), 2 steps: each run gets its reward and flags, every checkpoint (EMA or LoRA) is scored with the trained
    reward and the guards, and the JSON, Markdown and PNG are written."""
    bench = load_benchmark("reward_response")
    work = tmp_path / "rr"
    args = bench.parse_args([
        "--model", str(tiny_sdxl), "--work_dir", str(work), "--rewards", "brightness", "saturation", "--variants", "sft-paper",
        "--variant", "rlhf-fresh=rlhf:dpo_target=fresh,num_noisy_latents=2,use_lora=true,lora_rank=2", "--steps", "2", "--eval_every", "1",
        "--train_images", "4", "--eval_prompts", "2", "--images_per_prompt", "2", "--eval_steps", "2", "--threads", "1",
        "--set", "train_batch_size=2", "--set", "infer_steps=4", "--set", "sft-paper:use_ema=true"])
    results = bench.main(args)
    for reward in ("brightness", "saturation"):
        sft_cmd = (work / reward / "sft-paper.log").read_text().splitlines()[0]
        assert "--sft_target noise" in sft_cmd and "--use_ema" in sft_cmd
        assert (work / reward / "sft-paper" / "checkpoint-2" / "unet_ema" / "config.json").is_file()
        rlhf_cmd = (work / reward / "rlhf-fresh.log").read_text().splitlines()[0]
        assert f"--reward_model {reward}" in rlhf_cmd and "--dpo_target fresh" in rlhf_cmd and "--num_noisy_latents 2" in rlhf_cmd
        assert "--use_lora --lora_rank 2" in rlhf_cmd
        assert (work / reward / "rlhf-fresh" / "checkpoint-2" / "pytorch_lora_weights.safetensors").is_file()
        for name in ("sft-paper", "rlhf-fresh"):
            run = results[reward][name]
            assert [p["step"] for p in run["curve"]] == [0, 1, 2]
            assert set(run["final"]) == {reward, "toy/objects", "toy/relation", "toy/clean", "toy/size"}
            assert all(isinstance(p["diff"], float) for p in run["curve"])
    record = json.loads((work / "reward_response.json").read_text())
    assert record["runs"]["rlhf-fresh"]["flags"]["dpo_target"] == "fresh"
    assert record["runs"]["rlhf-fresh"]["flags"]["use_lora"] is True
    text = (work / "reward_response.md").read_text()
    assert "| rlhf-fresh |" in text and "**saturation**" in text
    assert (work / "reward_response.png").stat().st_size > 1000


def test_reward_response_variant_flags():
    """`true` / `false` switch on/off flags, other values stay strings; LoRA runs are evaluated through their adapters,
    EMA runs through their averaged weights."""
    from toyworld.recipe import flags, overrides_for

    bench = load_benchmark("reward_response")
    name, (kind, settings) = bench.parse_variant("lora=sft:use_lora=True,learning_rate=1e-4,use_ema=false")
    assert (name, kind, settings["use_lora"], settings["learning_rate"], settings["use_ema"]) == ("lora", "sft", True, "1e-4", False)
    command = flags(settings)
    assert "--use_lora" in command and command[command.index("--learning_rate") + 1] == "1e-4" and "--use_ema" not in command
    # 0 is a value, not "off": the recipe's seed 0 reaches the script (once dropped as 0 == False, so runs drew random seeds).
    assert flags({"seed": 0, "snr_gamma": None, "data_anchor_weight": 0.0}) == ["--seed", "0", "--data_anchor_weight", "0.0"]
    assert overrides_for("lora", ["lora:use_lora=false", "seed=3"]) == {"use_lora": False, "seed": "3"}
    model = str(ROOT / "models" / "toy-sdxl")
    assert bench.checkpoint_spec(settings, Path("ck"), model) == "lora=ck"
    assert bench.checkpoint_spec({"use_lora": False}, Path("ck"), model) == "unet=ck"
    # A checkpoint records no prediction type: a --prediction_type run is evaluated with the one it trained for.
    assert bench.checkpoint_spec({"prediction_type": "v_prediction"}, Path("ck"), model) == "unet=ck,pred=v_prediction"
    assert bench.checkpoint_spec({"use_ema": True}, Path("ck"), model) == f"unet={Path('ck') / 'unet_ema'}"
    assert bench.checkpoint_spec({"use_ema": True}, Path("ck"), str(ROOT / "models" / "toy-sd3")) == f"unet={Path('ck') / 'transformer_ema'}"
    # LoRA + EMA checkpoints hold the raw adapters (the output the averaged ones): refused before any training.
    with pytest.raises(SystemExit, match="use_ema"):
        bench.parse_args(["--variant", "x=sft:use_lora=true,use_ema=true"])
    with pytest.raises(SystemExit, match="use_ema"):
        bench.parse_args(["--variant", "x=sft:use_lora=true", "--set", "use_ema=true"])
    assert bench.parse_args(["--train_prompts", "112"]).train_prompts == 112
    quick = bench.parse_args(["--quick", "--steps", "60", "--eval_every", "20"])  # what is typed wins over --quick's values
    assert (quick.steps, quick.eval_every, quick.eval_prompts) == (60, 20, bench.QUICK["eval_prompts"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--train_prompts", "321"])


def test_reward_response_train_seeds_end_to_end(tiny_sdxl, tmp_path):
    """Two training runs of each variant: all are trained with their own seeds, evaluated, pooled into the table, and
    SFT is compared with ordinary fine-tuning (standard-ft) on the same seeds."""
    bench = load_benchmark("reward_response")
    work = tmp_path / "rr"
    results = bench.main(bench.parse_args([
        "--model", str(tiny_sdxl), "--work_dir", str(work), "--rewards", "brightness", "--variants", "standard-ft", "sft", "--train_seeds", "2",
        "--steps", "1", "--eval_every", "1", "--train_images", "4", "--eval_prompts", "2", "--images_per_prompt", "2",
        "--eval_steps", "2", "--threads", "1", "--set", "train_batch_size=2", "--set", "infer_steps=4"]))
    assert "--seed 0" in (work / "brightness" / "sft.log").read_text().splitlines()[0]
    assert "--seed 1" in (work / "brightness" / "sft.run1.log").read_text().splitlines()[0]
    evaluated = json.loads((work / "eval" / "results.json").read_text())["summary"]
    assert {"brightness/sft@1", "brightness/sft.run1@1"} <= set(evaluated)
    final = results["brightness"]["sft"]["final"]["brightness"]
    assert len(final["run_diffs"]) == 2 and final["diff"] == pytest.approx(sum(final["run_diffs"]) / 2)
    versus = results["brightness"]["sft"]["vs_control"]
    assert versus["diff"] == pytest.approx(final["diff"] - results["brightness"]["standard-ft"]["final"]["brightness"]["diff"], abs=1e-9)
    assert "vs_control" not in results["brightness"]["standard-ft"]
    text = (work / "reward_response.md").read_text()
    assert "mean of 2 training runs" in text and "| Δ brightness vs standard-ft |" in text


def test_reward_response_pools_training_seeds(tmp_path):
    """--train_seeds K: the J-th run trains with seed + J into its own folder, and Δ pools the K runs with an SE that
    adds the variance between runs to the evaluation's (hand-computed: 3 prompts x 2 images, base 0, two runs)."""
    bench = load_benchmark("reward_response")
    args = bench.parse_args(["--rewards", "toy", "--variants", "sft", "--train_seeds", "2", "--set", "seed=5"])
    first, second = (bench.run_flags(args, tmp_path, "toy", "sft", tmp_path, tmp_path, j) for j in (0, 1))
    assert (first["seed"], second["seed"]) == (5, 6)
    assert first["output_dir"] == str(tmp_path / "toy" / "sft") and second["output_dir"] == str(tmp_path / "toy" / "sft.run1")
    assert first["train_data_dir"] == str(tmp_path)  # the toy world's compositions unless --set names other data
    own = bench.parse_args(["--variants", "sft", "rlhf", "--set", "sft:train_data_dir=/data/own"])
    assert bench.run_flags(own, tmp_path, "toy", "sft", tmp_path, tmp_path)["train_data_dir"] == "/data/own"
    assert bench.run_flags(own, tmp_path, "toy", "rlhf", tmp_path, tmp_path)["prompt_file"] == str(tmp_path)
    with pytest.raises(SystemExit):
        bench.parse_args(["--train_seeds", "0"])

    scores = {"base": [0.0] * 6, "toy/sft@1": [1.0, None, 2.0, 2.0, 3.0, 3.0], "toy/sft.run1@1": [2.0, 2.0, 2.0, 2.0, 5.0, 5.0]}
    record = {"baseline": "base", "images_per_prompt": 2, "scores": {m: {"toy": v} for m, v in scores.items()},
              "summary": {"toy/sft@1": {"toy": {"mean": 2.0}}, "toy/sft.run1@1": {"toy": {"mean": 3.0}}}}
    entry = bench.pooled_entry(record, ["toy/sft@1", "toy/sft.run1@1"], "toy")
    # Per-prompt Δ (runs x prompts) [[1, 2, 3], [2, 2, 5]]: averaged over the runs 1.5, 2, 4 -> mean 2.5, SE sqrt(1.75 / 3);
    # runs' Δ 2 and 3 (variance 0.5); interaction residuals [[0, .5, -.5], [0, -.5, .5]] -> mean square 1 / 2, so the
    # run component is (0.5 - 0.5 / 3) / 2 = 1/6. Two-way: (MS_runs 1.5 + MS_prompts 3.5 - MS_int 0.5) / 6 = 0.75.
    assert entry["run_diffs"] == [2.0, 3.0] and entry["diff"] == pytest.approx(2.5) and entry["mean"] == pytest.approx(2.5)
    assert entry["eval_se"] == pytest.approx((1.75 / 3) ** 0.5) and entry["run_sd"] == pytest.approx(0.5 ** 0.5)
    assert entry["diff_se"] == pytest.approx(0.75 ** 0.5)
    # One run: the evaluation's own paired entry, unchanged.
    assert bench.pooled_entry(record, ["toy/sft@1"], "toy") == {"mean": 2.0}
    # Against one run of another variant (all 1): per-prompt 0.5, 1, 3; only our side has a spread to add.
    record["scores"]["toy/standard-ft@1"] = {"toy": [1.0] * 6}
    versus = bench.pooled_entry(record, ["toy/sft@1", "toy/sft.run1@1"], "toy", ["toy/standard-ft@1"])
    assert versus["diff"] == pytest.approx(1.5) and versus["diff_se"] == pytest.approx((1.75 / 3 + 1 / 6) ** 0.5)
    # Paired on the images every compared model scored: an unscored image leaves the base's mean of that prompt too
    # (averaging each side over its own images gave (0.4 + 0.1) / 2 here).
    masked = {"baseline": "base", "images_per_prompt": 2,
              "scores": {"base": {"r": [0.2, 0.8, 0.0, 0.0]}, "a": {"r": [None, 0.9, 0.1, 0.1]}, "b": {"r": [None, 0.9, 0.1, 0.1]}},
              "summary": {"a": {"r": {"mean": 0.5}}, "b": {"r": {"mean": 0.5}}}}
    assert bench.pooled_entry(masked, ["a", "b"], "r")["diff"] == pytest.approx(0.1)


def test_pooled_se_is_unbiased_for_the_mean_of_runs():
    """The SE of K runs' mean Δ has the variance of that mean in expectation: simulated Δ[k, p] = run_k + prompt_p +
    e[k, p] with known components. Adding the SD of the runs' Δs / sqrt K to the evaluation's SE counted e's share twice
    (expected 0.0603 here against the true 0.0502)."""
    bench = load_benchmark("reward_response")
    rng = np.random.default_rng(0)
    runs, prompts, reps = 8, 112, 3000
    sd_run, sd_prompt, sd_e = 0.15, 1.0, 2.0
    true_variance = sd_run ** 2 / runs + sd_prompt ** 2 / prompts + sd_e ** 2 / (runs * prompts)
    estimates = []
    for _ in range(reps):
        deltas = (rng.normal(0, sd_run, (runs, 1)) + rng.normal(0, sd_prompt, (1, prompts))
                  + rng.normal(0, sd_e, (runs, prompts)))
        eval_variance = deltas.mean(axis=0).var(ddof=1) / prompts
        estimates.append(eval_variance + bench.run_variance(deltas))
    assert np.mean(estimates) == pytest.approx(true_variance, rel=0.03)
    assert bench.run_variance(np.ones((1, 5))) == 0.0  # one run: nothing to estimate
    # A prompt with no scored image in some run is left out of the run component, not propagated as NaN.
    assert math.isfinite(bench.run_variance(np.array([[1.0, 2.0, np.nan, 3.0], [2.0, 2.0, 1.0, 5.0]])))


def test_two_runs_whose_spread_dominates_pass_3_se_by_chance_about_1_in_13():
    """The figure the benchmark's Markdown quotes for --train_seeds 2 or 3: sigma_runs of two runs has one degree of
    freedom, and when they agree by chance the pooled SE shrinks to the evaluation's. No gain at all, run SD 0.03
    (about 5.5 times the evaluation's SE of 0.0054), 56 prompts: "+3 SE" passes 7.6 % of the time (3 normal SEs: 0.13 %)."""
    bench = load_benchmark("reward_response")
    rng = np.random.default_rng(0)
    reps, runs, prompts = 20000, 2, 56
    deltas = rng.normal(0, 0.03, (reps, runs, 1)) + rng.normal(0, 0.02, (reps, 1, prompts)) + rng.normal(0, 0.05, (reps, runs, prompts))
    passes = 0
    for d in deltas:
        record = {"baseline": "base", "images_per_prompt": 1,
                  "scores": {"base": {"r": [0.0] * prompts}, **{f"run{k}": {"r": d[k].tolist()} for k in range(runs)}},
                  "summary": {f"run{k}": {"r": {"mean": 0.0}} for k in range(runs)}}
        entry = bench.pooled_entry(record, [f"run{k}" for k in range(runs)], "r")
        passes += entry["diff"] > 3 * entry["diff_se"]
    assert 1 / 15 < passes / reps < 1 / 11


def test_steps_to_3se_needs_the_run_to_stay_above():
    """A run that passes +3 SE at step 20 and falls back by the end has not reached it: the first checkpoint from
    which every later one stays above."""
    bench = load_benchmark("reward_response")
    point = lambda step, diff: {"step": step, "diff": diff, "diff_se": 1.0}
    assert bench.first_step_above([point(20, 4.0), point(40, 2.0), point(60, 4.0)]) == 60
    assert bench.first_step_above([point(20, 4.0), point(40, 5.0), point(60, -5.0)]) is None
    assert bench.first_step_above([point(20, 4.0), point(40, 5.0)]) == 20


def test_reward_response_refuses_unknown_variants(tmp_path):
    bench = load_benchmark("reward_response")
    with pytest.raises(SystemExit):
        bench.parse_args(["--variants", "nope"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--variant", "x=dpo:beta=1"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--set", "nope:beta_dpo=1"])


def test_caption_sensitivity_edits_captions_and_probes_the_shipped_toys(tmp_path):
    """The probe's wrong captions are the intended edits, and on both shipped toys the true caption explains their
    images better than no caption at t = 700 (where the caption matters most in loss units)."""
    probe = load_benchmark("caption_sensitivity")

    assert probe.relation_flipped("a red circle to the left of a blue square") == "a red circle to the right of a blue square"
    assert probe.relation_flipped("a small green triangle above a yellow circle") == "a small green triangle below a yellow circle"
    assert probe.colours_swapped("a large red circle below a blue square") == "a large blue circle below a red square"
    assert probe.order_swapped("a large red circle below a blue square") == "a blue square below a large red circle"
    relations = probe.parse_args(["--relations", "left", "above"]).relations
    assert relations == ["to the left of", "above"]
    chosen = probe.probe_prompts("pairs", relations)
    assert {world.parse_caption(c).relation for c in chosen} == set(relations) and len(chosen) == len(world.train_prompts("pairs")) // 2
    with pytest.raises(SystemExit):
        probe.parse_args(["--relations", "left", "--placed"])
    assert probe.place_flipped("a red circle at the top") == "a red circle at the bottom"
    assert probe.place_flipped("a small blue square on the right") == "a small blue square on the left"
    for family in ("sdxl", "sd3"):
        out = tmp_path / f"{family}.json"
        result = probe.main(["--model", str(ROOT / "models" / f"toy-{family}"), "--num_images", "16", "--timesteps", "700",
                             "--ideal_captions", "8", "--ideal_images", "32", "--output_json", str(out)])
        row = result["rows"][0]
        assert result["family"] == family and row["t"] == 700 and result["num_images"] == 16 and out.is_file()
        assert row["unconditional"]["mean"] > 2 * row["unconditional"]["se"] > 0
        assert result["pooled_distance"]["unconditional"] > result["pooled_distance"]["relation flipped"] > 0
        ideal = result["ideal_at_pure_noise"]  # a model that knew the captions would pay for every wrong one
        assert all(ideal[name]["mean"] > 3 * ideal[name]["se"] > 0 for name in ("relation flipped", "order swapped", "colours swapped"))
        expected_to_x0 = 0.7**2 if family == "sd3" else pytest.approx(1 / 0.0899, rel=0.01)  # sigma^2; 1 / SNR(700)
        assert row["x0_per_loss_unit"] == expected_to_x0
    placed = probe.main(["--model", str(ROOT / "models" / "toy-sd3"), "--placed", "--num_images", "8", "--timesteps", "700",
                         "--ideal_captions", "4", "--ideal_images", "16"])
    assert set(placed["rows"][0]) >= {"place flipped", "unconditional"} and "relation flipped" not in placed["rows"][0]
    assert placed["ideal_at_pure_noise"]["place flipped"]["mean"] > 0  # the place decides where the object's pixels are
