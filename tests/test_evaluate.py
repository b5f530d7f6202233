"""evaluate.py on the tiny SDXL: paired seeds (identical models give identical images, so the paired
difference is exactly 0), every way of naming a model, and the files it writes."""
from __future__ import annotations

import json
import re

import numpy as np
import torch
import pytest
from PIL import Image

import evaluate


def _run(tmp_path, models: list[str], *extra: str) -> dict:
    argv = [f"--model={m}" for m in models] + [
        "--num_prompts", "3", "--images_per_prompt", "2", "--steps", "3", "--resolution", "32",
        "--guidance_scale", "3", "--reward_model", "toy", "--output_dir", str(tmp_path / "eval"), "--device", "cpu", *extra,
    ]
    return evaluate.main(evaluate.parse_args(argv))


def _lora_folder(tiny_sdxl, folder):
    """A LoRA output like the trainers write, with freshly initialised adapters (B = 0: a no-op)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    StableDiffusionXLPipeline.save_lora_weights(str(folder), unet_lora_layers=get_peft_model_state_dict(unet), safe_serialization=True)
    return folder


def test_identical_models_give_identical_images_and_zero_paired_difference(tiny_sdxl, tmp_path):
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet").save_pretrained(tmp_path / "ft" / "unet")
    lora = _lora_folder(tiny_sdxl, tmp_path / "lora")
    record = _run(tmp_path, [f"base={tiny_sdxl}", f"same={tiny_sdxl}", f"unet={tiny_sdxl},unet={tmp_path / 'ft'}", f"lora={tiny_sdxl},lora={lora}"])

    out = tmp_path / "eval"
    saved = json.loads((out / "results.json").read_text())
    assert saved["baseline"] == "base" and len(saved["prompts"]) == 3
    base_scores = saved["scores"]["base"]["toy"]
    assert len(base_scores) == 6
    for name in ("same", "unet", "lora"):
        assert saved["scores"][name]["toy"] == base_scores
        assert saved["summary"][name]["toy"]["diff"] == 0.0 and saved["summary"][name]["toy"]["diff_se"] == 0.0
    assert record["summary"]["base"]["toy"]["prompts"] == 3

    table = (out / "results.md").read_text()
    assert "| model | toy |" in table and "+0.000 ± 0.000" in table and "toy/relation" in table
    for name in ("base", "same", "unet", "lora"):
        grid = Image.open(out / f"grid_{name}.png")
        assert grid.width > 128 and grid.height > 3 * 128
    compare = Image.open(out / "compare.png")
    assert compare.width > 4 * 128


def test_a_different_model_changes_images_and_the_difference(tiny_sdxl, tmp_path):
    from diffusers import UNet2DConditionModel
    import torch

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    with torch.no_grad():
        unet.conv_out.bias.add_(0.5)
    unet.save_pretrained(tmp_path / "other")
    _run(tmp_path, [f"base={tiny_sdxl}", f"other={tiny_sdxl},unet={tmp_path / 'other'}"], "--save_images")
    a = np.asarray(Image.open(tmp_path / "eval" / "images" / "base" / "img_00.png"), dtype=float)
    b = np.asarray(Image.open(tmp_path / "eval" / "images" / "other" / "img_00.png"), dtype=float)
    assert np.abs(a - b).mean() > 1.0
    # the saved images with their prompts form an imagefolder the SFT script can train on
    from datasets import load_dataset

    record = json.loads((tmp_path / "eval" / "results.json").read_text())
    folder = load_dataset("imagefolder", data_dir=str(tmp_path / "eval" / "images" / "other"), split="train")
    per_prompt = record["images_per_prompt"]
    assert folder["text"] == [p for p in record["prompts"] for _ in range(per_prompt)]
    assert np.abs(np.asarray(folder[0]["image"], dtype=float) - b).max() == 0


def test_bad_specs_fail_before_loading(tmp_path):
    with pytest.raises(ValueError, match="NAME=BASE"):
        evaluate.parse_model_spec("just-a-path")
    with pytest.raises(ValueError, match="unknown option"):
        evaluate.parse_model_spec("a=base,vae=x")
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--model", "a=base,unet=/does/not/exist"])
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--model", "a=x", "--model", "a=y"])
    with pytest.raises(SystemExit):  # 0 used to mean "all" and -1 "all but the last"
        evaluate.parse_args(["--model", "a=x", "--num_prompts", "0"])


def test_statistics_are_over_prompts():
    scores = {"base": {"r": np.array([0.0, 1.0, 1.0, 1.0])}, "new": {"r": np.array([1.0, 1.0, 1.0, np.nan])}}
    summary = evaluate.summarise(scores, "base", per_prompt_count=2)
    assert summary["base"]["r"]["mean"] == pytest.approx(0.75)  # prompt means 0.5 and 1.0
    assert summary["base"]["r"]["se"] == pytest.approx(0.25)
    assert summary["new"]["r"]["unscored_images"] == 1
    assert summary["new"]["r"]["diff"] == pytest.approx(0.25)  # paired: (1 - 0.5) and (1 - 1)


def test_estimates_print_their_se_to_two_significant_figures():
    """A paired SE of 0.00048 printed as "± 0.000" at three fixed decimals (docs/reward_response_sd3.md)."""
    f = evaluate.format_estimate
    assert f(-0.0041, 0.00048, signed=True) == "-0.00410 ± 0.00048"
    assert f(0.0054, 0.00053, signed=True) == "+0.00540 ± 0.00053"
    assert f(0.052, 0.0021, signed=True) == "+0.0520 ± 0.0021"
    assert f(0.5213, 0.019) == "0.521 ± 0.019" and f(0.5213, 0.19) == "0.521 ± 0.190"
    assert f(0.0, 0.0, signed=True) == "+0.000 ± 0.000" and f(0.25, float("nan")) == "0.250"
    assert f(float("nan"), 0.1) == "n/a"


def test_the_paired_difference_uses_only_seeds_both_models_scored():
    """3 prompts x 2 seeds; the new model is the baseline + 0.1 except one unscored image. Paired over the images
    both scored the difference is exactly +0.1; averaging each side over its own images gave 0.433 +- 0.333."""
    base = np.array([1.0, -1.0, 2.0, 0.0, 3.0, 1.0])
    new = base + 0.1
    new[1] = np.nan
    entry = evaluate.summarise({"base": {"r": base}, "new": {"r": new}}, "base", per_prompt_count=2)["new"]["r"]
    assert entry["diff"] == pytest.approx(0.1) and entry["diff_se"] == pytest.approx(0.0, abs=1e-12)
    assert entry["diff_prompts"] == 3 and entry["unscored_images"] == 1


def test_saved_image_names_sort_in_generation_order(tmp_path):
    """reward.py --prompts pairs prompts with files in sorted name order: names past 99 must not sort img_10 < img_100."""
    from sharpening.sdxl import save_images

    paths = save_images([Image.new("RGB", (1, 1))] * 101, tmp_path, "img")
    assert sorted(p.name for p in paths) == [p.name for p in paths] and paths[-1].name == "img_100.png"


def test_an_image_that_decoded_to_nan_is_scored_nan_not_black(tiny_sdxl, tmp_path, monkeypatch, capsys):
    """As in training: a non-finite decode (e.g. the stock VAE overflowing in fp16) is no score, not a black picture."""
    from sharpening import sdxl

    real_decode = sdxl.decode

    def decode_with_a_failure(vae, latents, chunk_size=8):
        images, finite = real_decode(vae, latents, chunk_size)
        finite[1] = False
        return images, finite

    monkeypatch.setattr(sdxl, "decode", decode_with_a_failure)
    record = _run(tmp_path, [f"base={tiny_sdxl}"], "--save_images")
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    scores = saved["scores"]["base"]["toy"]
    assert scores[1] is None and all(s is not None for i, s in enumerate(scores) if i != 1)
    assert record["summary"]["base"]["toy"]["unscored_images"] == 1
    # and it is no training data: kept on disk, left out of the imagefolder's metadata.jsonl
    folder = tmp_path / "eval" / "images" / "base"
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == ["img_00.png", "img_02.png", "img_03.png", "img_04.png", "img_05.png"]
    assert [r["text"] for r in rows] == [p for i, p in enumerate(p for p in record["prompts"] for _ in range(2)) if i != 1]
    assert (folder / "img_01.png").is_file()
    assert "1 non-finite image(s) left out of" in capsys.readouterr().out


def test_vae_precision_rule_is_the_trainings():
    import torch
    from types import SimpleNamespace

    from sharpening import sdxl

    stock, fixed = SimpleNamespace(config={"force_upcast": True}), SimpleNamespace(config={"force_upcast": False})
    assert sdxl.vae_dtype(stock, torch.float16) == torch.float32
    assert sdxl.vae_dtype(fixed, torch.float16) == torch.float16


# --------------------------------------------------------------------------------------------- review follow-ups
def test_grid_prompts_0_writes_the_results_without_grids(tiny_sdxl, tmp_path):
    """--grid_prompts 0 used to crash in image_grid([]) before results.json was written: the whole evaluation lost."""
    record = _run(tmp_path, [f"base={tiny_sdxl}"], "--grid_prompts", "0")
    out = tmp_path / "eval"
    assert json.loads((out / "results.json").read_text())["scores"] == record["scores"]
    assert (out / "results.md").is_file()
    assert not list(out.glob("*.png"))


def test_the_scores_are_written_before_the_grids(tiny_sdxl, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(evaluate, "image_grid", fail)
    with pytest.raises(OSError, match="disk full"):
        _run(tmp_path, [f"base={tiny_sdxl}"])
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert len(saved["scores"]["base"]["toy"]) == 6 and (tmp_path / "eval" / "results.md").is_file()


@pytest.mark.parametrize("flags, message", [
    (["--grid_prompts", "-1"], "--grid_prompts must be >= 0"),
    (["--batch_size", "0"], "--batch_size must be >= 1"),
    (["--decode_batch_size", "0"], "--decode_batch_size must be >= 1"),
    (["--model", "a=x,pred=sample"], "pred='sample'"),
    (["--model", "a/b=x", "--save_images"], "not a plain folder name"),
    (["--model", "a/b=x", "--model", "a_b=x"], "both make the file name grid_a_b.png"),
    (["--also_score", "saturation", "--clip_model", "ViT-B-32"], "--clip_model is a flag of the clip reward"),
    (["--prompt_file", "p.txt", "--toy_split", "train"], "--toy_split train chooses toy-world prompts"),
    (["--caption_column", "Prompts"], "--caption_column names the --prompt_file field"),
])
def test_bad_flags_fail_with_a_clear_message(flags, message, capsys):
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--model", "base=x", *flags])
    assert message in capsys.readouterr().err


def test_names_with_a_slash_are_fine_without_save_images():
    """The benchmarks name models `reward/variant@step`; only --save_images makes folders of the names."""
    args = evaluate.parse_args(["--model", "toy/sft@30=x", "--model", "saturation/sft@30=x"])
    assert [m.name for m in args.models] == ["toy/sft@30", "saturation/sft@30"]


def test_each_family_gets_its_own_text_defaults_in_one_run(tiny_sd3, tiny_flux, tmp_path):
    """SD3 then FLUX.1 in one run: FLUX.1 used to take SD3's defaults (CFG 5 as embedded guidance, 77 T5 tokens)
    written into the shared args. Its scores must be those of FLUX.1 evaluated alone, and results.json records each
    model's own settings."""
    def run(models, out):
        argv = [f"--model={m}" for m in models] + [
            "--num_prompts", "2", "--images_per_prompt", "1", "--steps", "2", "--resolution", "32", "--reward_model", "toy",
            "--output_dir", str(tmp_path / out), "--device", "cpu", "--grid_prompts", "0"]
        return evaluate.main(evaluate.parse_args(argv))

    mixed = run([f"sd3={tiny_sd3}", f"flux={tiny_flux}"], "mixed")
    alone = run([f"flux={tiny_flux}"], "alone")
    assert mixed["models"]["sd3"] | {"base": None} == {"base": None, "unet": None, "lora": None, "prediction_type": None,
                                                     "guidance_scale": 5.0, "max_sequence_length": 77}
    assert mixed["models"]["flux"] | {"base": None} == {"base": None, "unet": None, "lora": None, "prediction_type": None,
                                                      "guidance_scale": 3.5, "max_sequence_length": 512, "true_cfg_scale": 1.0}
    assert mixed["scores"]["flux"] == alone["scores"]["flux"]
    assert "sd3: CFG 5.0, flux: guidance 3.5 (embedded), true CFG 1.0" in (tmp_path / "mixed" / "results.md").read_text()


def test_true_cfg_scale_on_a_non_flux_model_fails_before_any_model_runs(tiny_sdxl, tiny_flux, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: pytest.fail("a model was sampled before the flags were checked"))
    with pytest.raises(ValueError, match="--true_cfg_scale is FLUX.1's"):
        _run(tmp_path, [f"flux={tiny_flux}", f"sdxl={tiny_sdxl}"], "--true_cfg_scale", "2")


def test_models_are_sampled_with_the_prediction_type_they_were_trained_for(tiny_sdxl, tmp_path, capsys):
    """The tiny SDXL is epsilon. A full fine-tune whose pipeline folder says v_prediction (save_pipeline writes the
    trained type into scheduler/), a LoRA whose model card says it, and pred=v_prediction all sample as v prediction;
    the same weights without a record sample as the base's epsilon."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    unet.save_pretrained(tmp_path / "plain" / "unet")
    unet.save_pretrained(tmp_path / "trained_v" / "unet")
    scheduler = DDIMScheduler.from_pretrained(tiny_sdxl, subfolder="scheduler")
    DDIMScheduler.from_config(scheduler.config, prediction_type="v_prediction").save_pretrained(tmp_path / "trained_v" / "scheduler")
    lora = _lora_folder(tiny_sdxl, tmp_path / "lora_v")
    (lora / "README.md").write_text('pipe.scheduler = pipe.scheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")\n')
    record = _run(tmp_path, [f"eps={tiny_sdxl},unet={tmp_path / 'plain'}", f"pred={tiny_sdxl},unet={tmp_path / 'plain'},pred=v_prediction",
                             f"folder={tiny_sdxl},unet={tmp_path / 'trained_v' / 'unet'}", f"card={tiny_sdxl},lora={lora}"])

    types = {name: m["prediction_type"] for name, m in record["models"].items()}
    assert types == {"eps": "epsilon", "pred": "v_prediction", "folder": "v_prediction", "card": "v_prediction"}
    scores = record["scores"]
    assert scores["folder"] == scores["pred"] and scores["card"] == scores["pred"]
    assert scores["eps"]["toy/clean"] != scores["pred"]["toy/clean"]  # the prediction type changes the images
    log = capsys.readouterr().out
    assert "warning: folder:" in log and "says v_prediction, its base" in log and "warning: card:" in log


def test_pred_on_a_flow_matching_model_fails_before_loading(tiny_sd3, tmp_path):
    with pytest.raises(ValueError, match="drop pred="):
        _run(tmp_path, [f"sd3={tiny_sd3},pred=v_prediction"])


def test_prompts_outside_the_toy_grammar_fail_or_warn_before_loading(tiny_sdxl, tmp_path, capsys):
    real = tmp_path / "real.txt"
    real.write_text("a photo of a cat\na watercolour of a lighthouse\na city at night\n")
    with pytest.raises(ValueError, match="None of the 3 prompts is a toy-world caption.*--reward_model"):
        _run(tmp_path, ["base=/no/such/model"], "--prompt_file", str(real))  # fails before the base would be read

    mixed = tmp_path / "mixed.txt"
    mixed.write_text("a photo of a cat\na red square\na blue circle\n")
    record = _run(tmp_path, [f"base={tiny_sdxl}"], "--prompt_file", str(mixed))
    assert "warning: 1 of 3 prompts are not toy-world captions" in capsys.readouterr().out
    assert record["summary"]["base"]["toy"]["prompts"] == 2 and record["summary"]["base"]["toy"]["unscored_images"] == 2


def test_the_prompt_column_is_the_caption_column(tmp_path):
    """evaluate's --prompt_file help named --caption_column, which evaluate did not have."""
    table = tmp_path / "prompts.csv"
    table.write_text("id,description\n1,a red square\n2,a blue circle\n")
    args = evaluate.parse_args(["--model", "base=x", "--prompt_file", str(table), "--caption_column", "description"])
    assert evaluate.load_prompts(args) == ["a red square", "a blue circle"]


def test_the_model_family_is_read_at_the_given_revision(monkeypatch):
    """--revision applies to model_index.json too: read at the default branch, a revision that changed the pipeline
    class would be sampled as the wrong family."""
    import sharpening.families as families

    seen = []
    monkeypatch.setattr(families, "model_index", lambda base, revision=None: seen.append((base, revision)) or {"_class_name": "StableDiffusion3Pipeline"})
    monkeypatch.setattr(families, "native_resolution", lambda family, base, revision=None: seen.append((base, revision)) or 1024)
    evaluate.resolve_models(evaluate.parse_args(["--model", "base=org/model", "--revision", "abc123"]))
    assert seen == [("org/model", "abc123")] * 2


def test_bases_of_different_sizes_need_resolution_before_any_model_runs(tiny_sdxl, tiny_sd3, tmp_path, monkeypatch):
    """Paired seeds need one latent size: without --resolution, bases made for different sizes fail from their configs,
    not after the first model has been sampled and scored."""
    from sharpening.families import family_of, native_resolution

    sizes = {native_resolution(family_of(str(p)), str(p)) for p in (tiny_sdxl, tiny_sd3)}
    assert len(sizes) == 2
    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: pytest.fail("a model was sampled before the sizes were checked"))
    argv = ["--model", f"sdxl={tiny_sdxl}", "--model", f"sd3={tiny_sd3}", "--num_prompts", "2", "--reward_model", "toy",
            "--output_dir", str(tmp_path / "out"), "--device", "cpu"]
    with pytest.raises(ValueError, match=r"different resolutions \(sdxl: \d+ px, sd3: \d+ px\).*give --resolution"):
        evaluate.main(evaluate.parse_args(argv))


def test_more_prompts_than_the_split_holds_is_an_error_not_a_silent_cut():
    """The benchmarks print the number they asked for: 320 held-out prompts gave 112 while the reports said 320."""
    args = evaluate.parse_args(["--model", "base=x", "--num_prompts", "320"])
    with pytest.raises(ValueError, match="--num_prompts 320: the toy world's heldout split has only 112 prompts"):
        evaluate.load_prompts(args)
    assert len(evaluate.load_prompts(evaluate.parse_args(["--model", "base=x", "--num_prompts", "112"]))) == 112


def test_a_lora_or_unet_that_does_not_fit_fails_before_any_model_is_scored(tiny_sdxl, tmp_path, monkeypatch):
    """A LoRA of another family (keys 'transformer.') loaded with diffusers' 'safe to ignore' warning and was scored
    as the base (+0.000 ± 0.000); a LoRA or unet= folder without weights failed after the models before it."""
    from safetensors.torch import save_file

    wrong = tmp_path / "wrong"
    wrong.mkdir()
    save_file({"transformer.blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8),
               "transformer.blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 4)}, str(wrong / "pytorch_lora_weights.safetensors"))
    with pytest.raises(ValueError, match=r"--model ft: the LoRA .* adapts 0 of 0 layers .*\['transformer'\]\): a LoRA of another model family"):
        _run(tmp_path, [f"base={tiny_sdxl}", f"ft={tiny_sdxl},lora={wrong}"])
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: pytest.fail("a model was sampled before the specs were checked"))
    with pytest.raises(FileNotFoundError, match=r"--model ft: no LoRA weights at"):
        _run(tmp_path, [f"base={tiny_sdxl}", f"ft={tiny_sdxl},lora={tmp_path / 'empty'}"])
    with pytest.raises(FileNotFoundError, match=r"--model ft: unet=.* holds no unet/config.json nor config.json"):
        _run(tmp_path, [f"base={tiny_sdxl}", f"ft={tiny_sdxl},unet={tmp_path / 'empty'}"])


@pytest.mark.parametrize("content, message", [
    (None, "--models_json .*: no such file"),
    ('{"a": "path"}', "model 'a' needs an object with \"base\""),  # was TypeError: string indices must be integers
    ('{"a": {"bse": "x"}}', "model 'a' needs an object with \"base\""),  # was KeyError: 'base'
    ('{"a": ', "not valid JSON"),
])
def test_a_bad_models_json_is_a_clear_error(tmp_path, capsys, content, message):
    path = tmp_path / "models.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--models_json", str(path)])
    assert re.search(message, capsys.readouterr().err)


def test_an_output_dir_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--model", "base=x", "--output_dir", str(tmp_path / "afile")])
    assert "is a file; give a folder" in capsys.readouterr().err
