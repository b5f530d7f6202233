"""reward.py on tiny random-weight twins: values, order, batching, strict loading, the spec, the mix, the CLI."""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import pickle
import shutil
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import reward as R  # noqa: E402
import rewards.registry as registry  # noqa: E402
import reward_twins as twins  # noqa: E402
from reward import (Reward, RewardOutput, Secret, add_reward_args, build_reward,  # noqa: E402
                    parse_reward_spec, register_reward)

N = 8


# ---------------------------------------------------------------------------------------------- twins
@pytest.fixture(scope="module")
def clip_twin(tmp_path_factory) -> argparse.Namespace:
    name, checkpoint = twins.write_tiny_clip(tmp_path_factory.mktemp("clip"))
    return argparse.Namespace(clip_model=name, clip_pretrained=str(checkpoint), reward_batch_size=3)


@pytest.fixture(scope="module")
def image_reward_twin(tmp_path_factory) -> argparse.Namespace:
    folder = twins.write_image_reward_twin(tmp_path_factory.mktemp("image_reward"))
    return argparse.Namespace(image_reward_model=str(folder), image_reward_tokenizer=str(folder / "tokenizer"),
                              reward_batch_size=3)


@pytest.fixture(scope="module")
def compositional_twin(tmp_path_factory, image_reward_twin) -> argparse.Namespace:
    folder = twins.write_compositional_twin(tmp_path_factory.mktemp("itercomp"))
    return argparse.Namespace(compositional_model=str(folder),
                              image_reward_tokenizer=image_reward_twin.image_reward_tokenizer, reward_batch_size=3)


@pytest.fixture(scope="module")
def rewards(clip_twin, image_reward_twin, compositional_twin) -> dict[str, Reward]:
    return {
        "clip": build_reward("clip", clip_twin),
        "image_reward": build_reward("image_reward", image_reward_twin),
        "compositional": build_reward("compositional", compositional_twin),
    }


@pytest.fixture(scope="module")
def batch():
    return twins.sample_images(N, seed=1), twins.sample_prompts(N)


def scores_with_batch_size(reward: Reward, size: int, images, prompts) -> torch.Tensor:
    saved = reward.batch_size
    reward.batch_size = size
    try:
        return reward.evaluate(images, prompts).total
    finally:
        reward.batch_size = saved


# ------------------------------------------------------------------------------------ every reward
@pytest.mark.parametrize("name", ["clip", "image_reward", "compositional"])
def test_output_contract(rewards, batch, name):
    reward = rewards[name]
    out = reward.evaluate(*batch)
    assert isinstance(out, RewardOutput)
    assert out.total.shape == (N,) and out.total.dtype == torch.float32 and out.total.device.type == "cpu"
    assert torch.isfinite(out.total).all()
    assert out.total.std() > 1e-3, "scores barely differ: order/batching tests below would prove nothing"
    torch.testing.assert_close(out.components[name], out.total)
    for value in out.components.values():
        assert value.shape == (N,) and value.dtype == torch.float32
    torch.testing.assert_close(reward(*batch), out.total)
    empty = reward.evaluate([], [])
    assert empty.total.shape == (0,)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        reward.evaluate(batch[0][:2], batch[1][:1])


@pytest.mark.parametrize("name", ["clip", "image_reward", "compositional"])
def test_batch_order_is_preserved(rewards, batch, name):
    images, prompts = batch
    reference = rewards[name].evaluate(images, prompts).total
    order = torch.randperm(N, generator=torch.Generator().manual_seed(0)).tolist()
    permuted = rewards[name].evaluate([images[i] for i in order], [prompts[i] for i in order]).total
    torch.testing.assert_close(permuted, reference[order], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["clip", "image_reward", "compositional"])
def test_score_does_not_depend_on_batch_size(rewards, batch, name):
    one = scores_with_batch_size(rewards[name], 1, *batch)
    for size in (3, N):
        torch.testing.assert_close(scores_with_batch_size(rewards[name], size, *batch), one, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["clip", "image_reward", "compositional"])
def test_long_prompt_is_truncated_not_fatal(rewards, batch, name):
    long_prompt = "a photo of a red cat sitting on a wooden house under a big green tree " * 12  # > 77 tokens
    image = batch[0][0]
    out = rewards[name].evaluate([image] * 3, [long_prompt, long_prompt + " and a blue dog", "a blue dog"])
    assert torch.isfinite(out.total).all()
    # truncated at the context length: words past it change nothing, while the prompt itself is read (not scored as "")
    assert out.total[0] == out.total[1] and out.total[0] != out.total[2]


# ---------------------------------------------------------------------------------------------- clip
def test_clip_is_cosine_of_the_model_encoders(rewards, clip_twin, batch):
    """Recomputed by hand from a fresh open_clip model loaded from the same checkpoint file."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(clip_twin.clip_model,
                                                                 pretrained=clip_twin.clip_pretrained)
    model.eval()
    tokenizer = open_clip.get_tokenizer(clip_twin.clip_model)
    images, prompts = batch
    with torch.no_grad():
        image_features = model.encode_image(torch.stack([preprocess(im) for im in images]))
        text_features = model.encode_text(tokenizer(prompts))
    expected = torch.tensor([
        float(i @ t / (i.norm() * t.norm())) for i, t in zip(image_features, text_features)])
    torch.testing.assert_close(rewards["clip"].evaluate(images, prompts).total, expected, atol=1e-5, rtol=0)
    assert expected.abs().max() <= 1.0  # cosine scale, not the upstream's x100


def test_clip_bad_weights_flags(clip_twin, tmp_path):
    with pytest.raises(ValueError, match="--clip_pretrained 'nonexistent-tag'"):
        build_reward("clip", argparse.Namespace(clip_model=clip_twin.clip_model, clip_pretrained="nonexistent-tag"))
    with pytest.raises(ValueError, match="--clip_model 'ViT-Nope'"):
        build_reward("clip", argparse.Namespace(clip_model="ViT-Nope", clip_pretrained="openai"))


# -------------------------------------------------------------------------------------- image_reward
def _write_checkpoint(folder: Path, state: dict, tokenizer_from: Path) -> argparse.Namespace:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps(twins.tiny_med_config()))
    return argparse.Namespace(image_reward_model=str(folder), image_reward_tokenizer=str(tokenizer_from))


def test_image_reward_rejects_unexpected_keys(image_reward_twin, tmp_path):
    state = twins.random_image_reward_state(0)
    state["blip.itm_head.weight"] = torch.zeros(2, 64)
    args = _write_checkpoint(tmp_path / "ckpt", state, Path(image_reward_twin.image_reward_tokenizer))
    with pytest.raises(ValueError, match=r"1 keys that are not part of the ImageReward architecture.*itm_head"):
        build_reward("image_reward", args)


def test_image_reward_rejects_missing_keys(image_reward_twin, tmp_path):
    state = twins.random_image_reward_state(0)
    del state["blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"]
    del state["mlp.layers.7.bias"]
    args = _write_checkpoint(tmp_path / "ckpt", state, Path(image_reward_twin.image_reward_tokenizer))
    with pytest.raises(ValueError, match=r"2 weights of the ImageReward architecture are missing.*head\.4\.bias"):
        build_reward("image_reward", args)


def test_image_reward_rejects_wrong_shapes(image_reward_twin, tmp_path):
    state = twins.random_image_reward_state(0)
    state["mlp.layers.2.weight"] = torch.zeros(128, 999)
    args = _write_checkpoint(tmp_path / "ckpt", state, Path(image_reward_twin.image_reward_tokenizer))
    with pytest.raises(ValueError, match="do not fit the architecture"):
        build_reward("image_reward", args)


def test_image_reward_rejects_wrong_or_empty_tokenizer(image_reward_twin, tmp_path):
    # offline, transformers returns a 5-token tokenizer for a hub id it cannot fetch, without an error
    args = argparse.Namespace(**{**vars(image_reward_twin), "image_reward_tokenizer": "bert-base-uncased"})
    with pytest.raises(ValueError, match="--image_reward_tokenizer 'bert-base-uncased' has .* tokens"):
        build_reward("image_reward", args)


def test_image_reward_missing_files_name_the_flag(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="--image_reward_model .* lacks ImageReward.pt, med_config.json"):
        build_reward("image_reward", argparse.Namespace(image_reward_model=str(tmp_path / "empty")))
    with pytest.raises(RuntimeError, match="'THUDM/ImageReward': no such local folder, and cannot get ImageReward.pt"):
        build_reward("image_reward", argparse.Namespace(image_reward_model="THUDM/ImageReward"))


def test_image_reward_med_config_must_cross_attend(image_reward_twin, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(image_reward_twin.image_reward_model, folder)
    med = twins.tiny_med_config()
    med["add_cross_attention"] = False
    (folder / "med_config.json").write_text(json.dumps(med))
    with pytest.raises(ValueError, match="add_cross_attention"):
        build_reward("image_reward",
                     argparse.Namespace(**{**vars(image_reward_twin), "image_reward_model": str(folder)}))


# ------------------------------------------------------------------------------------- compositional
def test_compositional_is_the_mean_of_itercomp_models(rewards, compositional_twin, batch, tmp_path):
    out = rewards["compositional"].evaluate(*batch)
    aspects = ["attribute_binding", "spatial_relationship", "non_spatial_relationship"]
    assert set(out.components) == {"compositional", *(f"compositional/{a}" for a in aspects)}
    stacked = torch.stack([out.components[f"compositional/{a}"] for a in aspects])
    torch.testing.assert_close(out.total, stacked.mean(0))
    assert (stacked[0] - stacked[1]).abs().max() > 1e-3  # three different models, not one loaded thrice
    # each component is exactly an ImageReward-architecture model loaded from that checkpoint
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(Path(compositional_twin.compositional_model) / "spatial_relationship.pt", single / "ImageReward.pt")
    shutil.copy(Path(compositional_twin.compositional_model) / "med_config.json", single / "med_config.json")
    alone = build_reward("image_reward", argparse.Namespace(
        image_reward_model=str(single), image_reward_tokenizer=compositional_twin.image_reward_tokenizer))
    torch.testing.assert_close(alone.evaluate(*batch).total, out.components["compositional/spatial_relationship"],
                               atol=1e-5, rtol=0)


def test_compositional_without_weights_names_the_flag(compositional_twin, tmp_path):
    with pytest.raises(ValueError, match="--compositional_model"):
        build_reward("compositional", argparse.Namespace(compositional_model=None))
    partial = tmp_path / "partial"
    shutil.copytree(compositional_twin.compositional_model, partial)
    (partial / "spatial_relationship.pt").unlink()
    with pytest.raises(FileNotFoundError, match="--compositional_model .* lacks spatial_relationship.pt"):
        build_reward("compositional", argparse.Namespace(compositional_model=str(partial)))


# ------------------------------------------------------------------------------------------ the spec
@pytest.mark.parametrize("spec, expected", [
    ("clip", [("clip", 1.0)]),
    ("clip:1.0,image_reward:0.5", [("clip", 1.0), ("image_reward", 0.5)]),
    (" mllm : 2 , compositional ", [("mllm", 2.0), ("compositional", 1.0)]),
    ("image_reward:1e-1", [("image_reward", 0.1)]),
])
def test_parse_reward_spec(spec, expected):
    assert parse_reward_spec(spec) == expected


def test_unknown_reward_lists_valid_names():
    with pytest.raises(ValueError) as info:
        parse_reward_spec("clip,aesthetics")
    message = str(info.value)
    assert "'aesthetics'" in message
    assert all(name in message for name in ("clip", "image_reward", "compositional", "mllm"))


@pytest.mark.parametrize("spec, match", [
    ("clip:abc", "not a number"), ("clip:", "not a number"), ("clip:nan", "finite number > 0"),
    ("clip:inf", "finite number > 0"), ("clip:0", "finite number > 0"), ("clip:-1", "finite number > 0"),
    ("clip:1:2", "not a number"), ("clip:1_0", "not a number"),  # float() reads "1_0" as 10
    ("clip,clip:2", "twice"), ("", "empty"), ("clip,,mllm", "empty entry"),
])
def test_parse_reward_spec_rejects(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_reward_spec(spec)


def test_register_reward_refuses_to_replace_a_different_factory(monkeypatch):
    monkeypatch.setattr(registry, "REWARDS", dict(registry.REWARDS))

    def build(args, device, dtype):
        raise AssertionError("not called")

    register_reward("toy_test")(build)
    register_reward("toy_test")(build)  # the same plugin imported twice is fine
    with pytest.raises(ValueError, match="already registered"):
        register_reward("clip")(build)
    with pytest.raises(ValueError, match="letters, digits"):
        register_reward("bad:name")


# ---------------------------------------------------------------------------------------- weighted mix
class _Fixed(Reward):
    def __init__(self, name: str, values: list[float], sleep: float = 0.0, io_bound: bool = False):
        self.name, self.values, self.sleep, self.io_bound = name, values, sleep, io_bound
        self.thread = None

    def evaluate(self, images, prompts):
        self.thread = threading.current_thread().name
        time.sleep(self.sleep)
        total = torch.tensor(self.values[: len(images)], dtype=torch.float32)
        return RewardOutput(total=total, components={self.name: total})

    def counters(self):
        return {f"{self.name}/calls": 1}


def test_weighted_mix_is_the_weighted_sum_of_components(rewards, clip_twin, image_reward_twin, batch):
    args = argparse.Namespace(**{**vars(clip_twin), **vars(image_reward_twin)})
    mix = build_reward("clip:1.0,image_reward:0.5", args)
    out = mix.evaluate(*batch)
    clip, image_reward = rewards["clip"].evaluate(*batch).total, rewards["image_reward"].evaluate(*batch).total
    assert set(out.components) == {"clip", "image_reward"}
    torch.testing.assert_close(out.components["clip"], clip, atol=1e-5, rtol=0)  # unweighted
    torch.testing.assert_close(out.components["image_reward"], image_reward, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.total, 1.0 * clip + 0.5 * image_reward, atol=1e-5, rtol=0)
    scaled = build_reward("clip:0.25", clip_twin).evaluate(*batch)
    torch.testing.assert_close(scaled.total, 0.25 * clip, atol=1e-5, rtol=0)
    torch.testing.assert_close(scaled.components["clip"], clip, atol=1e-5, rtol=0)


def test_weighted_mix_propagates_nan_and_merges_counters(monkeypatch, batch):
    monkeypatch.setattr(registry, "REWARDS", dict(registry.REWARDS))
    register_reward("fixed_a")(lambda args, device, dtype: _Fixed("fixed_a", [1.0, 2.0, 3.0]))
    register_reward("fixed_b")(lambda args, device, dtype: _Fixed("fixed_b", [10.0, float("nan"), 30.0]))
    mix = build_reward("fixed_a:2,fixed_b:0.5", None)
    out = mix.evaluate(batch[0][:3], batch[1][:3])
    assert out.total[0] == 7.0 and math.isnan(out.total[1]) and out.total[2] == 21.0
    assert out.components["fixed_a"].tolist() == [1.0, 2.0, 3.0]
    assert mix.counters() == {"fixed_a/calls": 1, "fixed_b/calls": 1}


def test_weighted_mix_keeps_the_toy_score_beside_its_sub_scores(batch):
    """The toy reward reports objects / relation / clean as components; in a mix its own score must not vanish."""
    from toyworld import world

    images, prompts = (list(column) for column in zip(*world.generate(world.train_prompts("pairs")[:2], 2, seed=0)))
    toy = build_reward("toy", None).evaluate(images, prompts)
    assert torch.isfinite(toy.total).all()
    out = build_reward("toy:1,brightness:1", None).evaluate(images, prompts)
    assert {"toy", "toy/objects", "toy/relation", "toy/clean", "brightness"} <= set(out.components)
    torch.testing.assert_close(out.components["toy"], toy.total)
    torch.testing.assert_close(out.total, toy.total + out.components["brightness"])


def test_weighted_mix_overlaps_remote_graders_with_local_models(batch):
    remote = _Fixed("remote", [1.0, 1.0], sleep=0.4, io_bound=True)
    local = _Fixed("local", [2.0, 2.0], sleep=0.4)
    mix = R.WeightedSumReward([(local, 1.0), (remote, 1.0)])
    start = time.perf_counter()
    out = mix.evaluate(batch[0][:2], batch[1][:2])
    assert time.perf_counter() - start < 0.75
    assert out.total.tolist() == [3.0, 3.0]
    assert remote.thread != local.thread


def test_pixel_rewards_have_their_documented_values():
    """The rewards behind the reward-response tables, on images whose values are known by construction: a sign flip
    or the wrong HSV channel would otherwise pass every test (training and evaluation would share the mistake)."""
    from PIL import Image

    grey, red, dark = (Image.new("RGB", (32, 32), colour) for colour in ((128, 128, 128), (255, 0, 0), (0, 0, 64)))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    images = [grey, red, dark, noise]
    scores = {name: build_reward(name, None).evaluate(images, [""] * 4).total for name in
              ("brightness", "saturation", "jpeg_compressibility", "jpeg_incompressibility")}
    # luma (ITU-R 601): grey 128, pure red 0.299 * 255 = 76, dark blue 0.114 * 64 = 7
    torch.testing.assert_close(scores["brightness"][:3], torch.tensor([128, 76, 7]) / 255, rtol=0, atol=1e-6)
    torch.testing.assert_close(scores["saturation"][:3], torch.tensor([0.0, 1.0, 1.0]), rtol=0, atol=1e-6)
    assert 0.3 < scores["saturation"][3] < 0.7  # uniform noise: mean HSV saturation about one half
    sizes = scores["jpeg_incompressibility"]  # kB of a quality-95 JPEG: a flat image is far smaller than noise
    torch.testing.assert_close(scores["jpeg_compressibility"], -sizes)
    assert sizes[3] > 2 * sizes[0] > 0


# ----------------------------------------------------------------------------------- flags and secrets
def test_reward_flags_have_defaults_and_help():
    parser = argparse.ArgumentParser()
    add_reward_args(parser)
    args = parser.parse_args([])
    assert (args.reward_model, args.clip_model, args.clip_pretrained) == ("clip", "ViT-L-14", "openai")
    assert (args.mllm_model, args.mllm_concurrency, args.image_reward_model) == ("gpt-4o", 16, "THUDM/ImageReward")
    assert args.api_key is None and args.compositional_model is None
    for action in parser._actions:
        if action.dest != "help":
            assert action.help and len(action.help) > 15, action.dest


@pytest.mark.parametrize("argv, specs, message", [
    (["--api_key", "sk-1"], ["clip"], r"--api_key is a flag of the mllm reward, and no selected reward \(clip\) uses it: add mllm"),
    (["--clip_model", "ViT-B-32", "--mllm_model", "gpt-5"], ["saturation"], "--clip_model, --mllm_model are flags of the clip and mllm rewards"),
    (["--image_reward_model", "/w"], ["compositional"], "--image_reward_model is a flag of the image_reward reward"),
])
def test_a_flag_of_a_reward_that_is_not_selected_is_refused(argv, specs, message):
    """`--reward_model clip --api_key KEY` ran CLIP and dropped the key without a word; a weights path for a reward
    left out of the spec is almost always a typo in it."""
    parser = argparse.ArgumentParser()
    add_reward_args(parser, argv)
    with pytest.raises(ValueError, match=message):
        R.check_reward_flags_used(parser.parse_args(argv), specs)


@pytest.mark.parametrize("argv, specs", [
    (["--api_key", "sk-1", "--clip_model", "ViT-B-32"], ["clip:1.0,mllm:0.5"]),  # each read by a reward of the sum
    (["--clip_model", "ViT-B-32"], ["toy", "clip"]),  # evaluate: --reward_model toy --also_score clip
    (["--image_reward_tokenizer", "/tok"], ["compositional"]),  # compositional reads image_reward's tokenizer flag
    (["--clip_model", "ViT-L-14"], ["brightness"]),  # the default value: nothing was asked for
])
def test_flags_a_selected_reward_reads_are_accepted(argv, specs):
    parser = argparse.ArgumentParser()
    add_reward_args(parser, argv)
    R.check_reward_flags_used(parser.parse_args(argv), specs)


def test_secret_never_shows_its_value():
    key = Secret("sk-very-secret-value")
    assert "very-secret" not in repr(key) + str(key) + f"{key}" + repr(argparse.Namespace(api_key=key))
    assert key.reveal() == "sk-very-secret-value"
    assert copy.deepcopy(key).reveal() == "sk-very-secret-value"  # trainers deep-copy args
    assert b"very-secret" not in pickle.dumps(argparse.Namespace(api_key=key))  # a pickled config holds no key
    assert not Secret("")


# ------------------------------------------------------------------------------------------ the command
def _folder(tmp_path: Path, count: int = 3) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(twins.sample_images(count, seed=4)):
        image.save(folder / f"img_{i}.png")
    return folder


def test_command_scores_a_folder(clip_twin, tmp_path, capsys):
    folder = _folder(tmp_path)
    rows = [{"file_name": f"img_{i}.png", "text": f"a red cat number {i}"} for i in range(3)]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out_json = tmp_path / "out" / "scores.json"
    assert R.main(["--reward_model", "clip", "--images", str(folder), "--json", str(out_json), "--device", "cpu",
                   "--clip_model", clip_twin.clip_model, "--clip_pretrained", clip_twin.clip_pretrained]) == 0
    printed = capsys.readouterr().out
    assert "file" in printed and "img_2.png" in printed and "a red cat number 1" in printed
    assert "mean (3 images, 0 NaN)" in printed
    document = json.loads(out_json.read_text())
    expected = build_reward("clip", clip_twin).evaluate(
        [R.Image.open(folder / f"img_{i}.png") for i in range(3)], [r["text"] for r in rows]).total
    assert [r["file"] for r in document["results"]] == ["img_0.png", "img_1.png", "img_2.png"]
    assert [r["total"] for r in document["results"]] == pytest.approx(expected.tolist(), abs=1e-5)
    assert document["mean"]["total"] == pytest.approx(float(expected.mean()), abs=1e-5)


def test_command_with_prompts_file(clip_twin, tmp_path, capsys):
    folder = _folder(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\nthree\n")
    R.main(["--reward_model", "clip:2", "--images", str(folder), "--prompts", str(prompts), "--device", "cpu",
            "--clip_model", clip_twin.clip_model, "--clip_pretrained", clip_twin.clip_pretrained])
    printed = capsys.readouterr().out
    assert "three" in printed and "clip" in printed and "total" in printed


@pytest.mark.parametrize("setup, error, match", [
    ("no_prompts", FileNotFoundError, "pass --prompts FILE .* metadata.jsonl"),
    ("missing_column", ValueError, r"metadata.jsonl:2: missing column\(s\) \['text'\]"),
    ("missing_image", FileNotFoundError, "metadata.jsonl:1: image 'nope.png' not found"),
    ("bad_json", ValueError, "metadata.jsonl:1: not valid JSON"),
    ("null_text", ValueError, "metadata.jsonl:1: text is None; give each image its prompt as a non-empty string"),
    ("empty_text", ValueError, "metadata.jsonl:1: text is ''; give each image its prompt as a non-empty string"),
    ("line_count", ValueError, "has 2 lines but .* has 3 images"),
    ("blank_line", ValueError, r"line\(s\) \[2\] are blank; every image needs its prompt"),  # was scored against ""
    ("jsonl_prompts", ValueError, "give a text file, one prompt per line"),  # its lines were scored as prompts, JSON and all
    ("latin1", ValueError, "p.txt is not UTF-8 text .* save it as UTF-8"),
])
def test_command_input_errors(tmp_path, setup, error, match):
    folder = _folder(tmp_path)
    prompts = None
    if setup == "missing_column":
        (folder / "metadata.jsonl").write_text('{"file_name": "img_0.png", "text": "a"}\n{"file_name": "img_1.png"}\n')
    elif setup == "missing_image":
        (folder / "metadata.jsonl").write_text('{"file_name": "nope.png", "text": "a"}\n')
    elif setup == "null_text":
        (folder / "metadata.jsonl").write_text('{"file_name": "img_0.png", "text": null}\n')
    elif setup == "bad_json":
        (folder / "metadata.jsonl").write_text('{"file_name": \n')
    elif setup == "empty_text":
        (folder / "metadata.jsonl").write_text('{"file_name": "img_0.png", "text": ""}\n')
    elif setup == "line_count":
        prompts = tmp_path / "p.txt"
        prompts.write_text("a\nb\n")
    elif setup == "blank_line":
        prompts = tmp_path / "p.txt"
        prompts.write_text("a\n \nc\n")
    elif setup == "jsonl_prompts":
        prompts = tmp_path / "p.jsonl"
        prompts.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c"}\n')
    elif setup == "latin1":
        prompts = tmp_path / "p.txt"
        prompts.write_bytes("caf\xe9\nb\nc\n".encode("latin-1"))
    with pytest.raises(error, match=match):
        R.load_scoring_items(folder, prompts)


def test_command_prompt_readers_split_lines_on_newline_only(tmp_path):
    """A byte-order mark is no part of prompt 0; U+2028 and U+0085 inside a prompt or a metadata line do not split it."""
    folder = _folder(tmp_path)
    prompts = tmp_path / "p.txt"
    prompts.write_bytes("\ufeffa cat\r\nb\u2028c\r\nd\x85e\n".encode())
    items = R.load_scoring_items(folder, prompts)
    assert [(path.name, text) for path, text in items] == [("img_0.png", "a cat"), ("img_1.png", "b\u2028c"), ("img_2.png", "d\x85e")]
    rows = [{"file_name": "img_1.png", "text": "x\u2028y"}, {"file_name": "img_2.png", "text": "z"}]
    (folder / "metadata.jsonl").write_bytes(("\ufeff" + "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows)).encode())
    items = R.load_scoring_items(folder, None)
    assert [(path.name, text) for path, text in items] == [("img_1.png", "x\u2028y"), ("img_2.png", "z")]


def test_a_utf16_prompt_file_reads_like_utf8(tmp_path):
    """PowerShell 5's `>` writes UTF-16 with a byte-order mark: it failed with a bare UnicodeDecodeError naming no file."""
    folder = _folder(tmp_path)
    prompts = tmp_path / "p.txt"
    prompts.write_bytes("a cat\r\nb\r\nc\r\n".encode("utf-16"))
    assert [text for _, text in R.load_scoring_items(folder, prompts)] == ["a cat", "b", "c"]


def test_an_unreadable_image_is_scored_nan_and_the_rest_are_scored(clip_twin, tmp_path, capsys):
    """One truncated file ended the whole run (and, with a paid grader, every batch before it) without a table."""
    folder = _folder(tmp_path)
    data = (folder / "img_1.png").read_bytes()
    (folder / "img_1.png").write_bytes(data[: len(data) // 2])
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": f"img_{i}.png", "text": f"a cat {i}"}) for i in range(3)))
    out_json = tmp_path / "scores.json"
    assert R.main(["--reward_model", "clip", "--images", str(folder), "--json", str(out_json), "--device", "cpu", "--chunk_size", "1",
                   "--clip_model", clip_twin.clip_model, "--clip_pretrained", clip_twin.clip_pretrained]) == 0
    captured = capsys.readouterr()
    assert "mean (3 images, 1 NaN)" in captured.out and "skipped" in captured.err and "img_1.png" in captured.err
    results = json.loads(out_json.read_text())["results"]
    assert [r["total"] is None for r in results] == [False, True, False] and set(results[1]) == set(results[0])


def test_an_image_over_pils_pixel_limit_is_skipped_not_fatal(tmp_path, monkeypatch, capsys):
    """PIL's DecompressionBombError is not an OSError: one such file ended the whole scoring run."""
    from PIL import Image

    Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 64 pixels is over twice the limit: an error, not a warning
    assert R._read_image(tmp_path / "big.png") is None
    assert "skipped" in capsys.readouterr().err


def test_command_rejects_unknown_reward_before_loading(capsys):
    with pytest.raises(SystemExit):
        R.main(["--reward_model", "clip,nope", "--images", "."])
    assert "unknown reward 'nope'" in capsys.readouterr().err


def test_a_clip_weights_file_for_an_openai_architecture_warns_about_quickgelu(tmp_path, monkeypatch, caplog):
    """A file does not say its activation: ViT-B-32 from a file is built with GELU, which is wrong for OpenAI's weights
    (trained with QuickGELU) and shifts every score silently, so the user is told how to say which they have."""
    import logging

    import open_clip

    from rewards.clip import open_clip_backbone

    weights = tmp_path / "clip.pt"
    weights.write_bytes(b"")
    built = []
    monkeypatch.setattr(open_clip, "create_model_and_transforms",
                        lambda name, **kwargs: built.append((name, kwargs["force_quick_gelu"])) or (torch.nn.Linear(1, 1), None, None))
    with caplog.at_level(logging.WARNING):
        open_clip_backbone("ViT-B-32", str(weights), torch.device("cpu"), torch.float32, "--clip_model", "--clip_pretrained")
    assert built == [("ViT-B-32", False)] and "--clip_model ViT-B-32-quickgelu" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        open_clip_backbone("ViT-B-32-quickgelu", str(weights), torch.device("cpu"), torch.float32, "--clip_model", "--clip_pretrained")
    assert built[-1][0] == "ViT-B-32-quickgelu" and "QuickGELU" not in caplog.text  # said which: nothing to warn about


def test_missing_clip_weights_name_the_flags_and_the_offline_route(tmp_path, monkeypatch):
    import open_clip

    from rewards.clip import open_clip_backbone
    from rewards.model_files import single_model_file

    def offline(*args, **kwargs):
        raise RuntimeError("Failed to download weights for tag 'openai': no network")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", offline)
    with pytest.raises(RuntimeError, match=r"--clip_model ViT-B-32 --clip_pretrained openai: cannot download .* Without network, "
                                           r"pass a local checkpoint file to --clip_pretrained \(for OpenAI's weights with --clip_model ViT-B-32-quickgelu\)"):
        open_clip_backbone("ViT-B-32", "openai", torch.device("cpu"), torch.float32, "--clip_model", "--clip_pretrained")
    # A mistyped file path shaped like "org/name" is a missing file, not a hub repo to try.
    with pytest.raises(FileNotFoundError, match=r"^--aesthetic_model 'weights/aesthetic.pth': no such file\.$"):
        single_model_file("weights/aesthetic.pth", "aesthetic-model.pth", "--aesthetic_model")
