"""pickscore, hpsv2 and aesthetic on tiny random-weight twins, each against its reference: the hpsv2 package's
own scoring code, transformers' CLIPModel forward (PickScore's logits), and the LAION predictor's inference
recipe. Also: the contract every reward keeps, sharing a backbone in a mix, and flags added by a plugin."""
from __future__ import annotations

import argparse
import os
import re
import sys
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
from reward import add_reward_args, build_reward  # noqa: E402

N = 6
ATOL = 1e-4  # the bar: our scores equal the reference's on the same weights


@pytest.fixture(scope="module")
def batch():
    images, prompts = twins.sample_images(N, seed=3), twins.sample_prompts(N)
    return images, prompts


@pytest.fixture(scope="module")
def hps_args(tmp_path_factory):
    name, folder = twins.write_hps_twin(tmp_path_factory.mktemp("hps"))
    return argparse.Namespace(hpsv2_checkpoint=str(folder), hpsv2_clip_model=name, reward_batch_size=4)


@pytest.fixture(scope="module")
def pickscore_args(tmp_path_factory):
    model, processor = twins.write_pickscore_twin(tmp_path_factory.mktemp("pickscore"))
    return argparse.Namespace(pickscore_model=str(model), pickscore_processor=str(processor), reward_batch_size=4)


@pytest.fixture(scope="module")
def aesthetic_args(tmp_path_factory):
    folder = tmp_path_factory.mktemp("aesthetic")
    name, checkpoint = twins.write_tiny_clip(folder / "clip")
    twins.write_aesthetic_twin(folder / "head", in_features=twins.TINY_CLIP_CONFIG["embed_dim"])
    return argparse.Namespace(aesthetic_model=str(folder / "head"), aesthetic_clip_model=name,
                              aesthetic_clip_pretrained=str(checkpoint), clip_model=name,
                              clip_pretrained=str(checkpoint), reward_batch_size=4)


@pytest.fixture(scope="module")
def rewards(hps_args, pickscore_args, aesthetic_args):
    return {"hpsv2": build_reward("hpsv2", hps_args), "pickscore": build_reward("pickscore", pickscore_args),
            "aesthetic": build_reward("aesthetic", aesthetic_args)}


# ------------------------------------------------------------------------------------------ contract
@pytest.mark.parametrize("name", ["hpsv2", "pickscore", "aesthetic"])
def test_output_contract_order_and_batch_size(rewards, batch, name):
    reward, (images, prompts) = rewards[name], batch
    out = reward.evaluate(images, prompts)
    assert out.total.shape == (N,) and out.total.dtype == torch.float32 and torch.isfinite(out.total).all()
    assert out.total.std() > 1e-3, "scores barely differ: the comparisons below would prove little"
    torch.testing.assert_close(out.components[name], out.total)
    order = [5, 2, 0, 4, 1, 3]
    permuted = reward.evaluate([images[i] for i in order], [prompts[i] for i in order]).total
    torch.testing.assert_close(permuted, out.total[order], atol=1e-5, rtol=0)
    reward.batch_size = 1
    try:
        torch.testing.assert_close(reward.evaluate(images, prompts).total, out.total, atol=1e-5, rtol=0)
    finally:
        reward.batch_size = 4
    assert reward.evaluate([], []).total.shape == (0,)


# --------------------------------------------------------------------------------------------- hpsv2
def test_hpsv2_equals_the_hpsv2_package(rewards, hps_args, batch, monkeypatch):
    """hpsv2.img_score.score (the package's own preprocessing, tokenizer, forward and dot product) on the same
    weights. The package hard-codes ViT-H-14 with a download, so its model slot is filled with the twin's
    architecture built by the package's vendored open_clip; score() then loads the checkpoint itself."""
    img_score = pytest.importorskip("hpsv2.img_score")
    from hpsv2.src import open_clip as hps_open_clip

    twins.register_open_clip_config(hps_open_clip, Path(hps_args.hpsv2_checkpoint), twins.TINY_HPS_NAME,
                                    twins.TINY_HPS_CONFIG)
    model, _, preprocess_val = hps_open_clip.create_model_and_transforms(
        twins.TINY_HPS_NAME, None, precision="fp32", device="cpu", light_augmentation=True, output_dict=True)
    monkeypatch.setattr(img_score, "device", "cpu")
    monkeypatch.setattr(img_score, "model_dict", {"model": model, "preprocess_val": preprocess_val})
    checkpoint = str(Path(hps_args.hpsv2_checkpoint) / "HPS_v2.1_compressed.pt")
    images, prompts = batch
    # the package keeps RGBA images as 4 channels and then fails to normalise them; it scores RGB
    expected = torch.tensor([float(img_score.score([image.convert("RGB")], prompt, cp=checkpoint, hps_version="v2.1")[0])
                             for image, prompt in zip(images, prompts)])
    torch.testing.assert_close(rewards["hpsv2"].evaluate(images, prompts).total, expected, atol=ATOL, rtol=0)


def test_hpsv2_preprocessing_pads_the_short_side(batch):
    """Resize the long side to the model size and zero-pad around the image (in pixel space, before normalising)."""
    transform = R.hps_preprocess(32)
    wide = twins.sample_images(1, seed=5, size=(64, 32))[0]
    pixels = transform(wide)
    assert pixels.shape == (3, 32, 32)
    mean = torch.tensor(R.CLIP_PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(R.CLIP_PIXEL_STD).view(3, 1, 1)
    black = (0 - mean) / std
    torch.testing.assert_close(pixels[:, :8], black.expand(3, 8, 32))  # 16 rows of image, 8 of padding each side
    torch.testing.assert_close(pixels[:, -8:], black.expand(3, 8, 32))
    assert not torch.allclose(pixels[:, 8:24], black.expand(3, 16, 32))


def test_hpsv2_refuses_a_checkpoint_of_another_architecture(tmp_path, hps_args):
    torch.save({"state_dict": {"visual.proj": torch.zeros(2, 2)}}, tmp_path / "HPS_v2.1_compressed.pt")
    with pytest.raises(ValueError, match="does not fit --hpsv2_clip_model"):
        build_reward("hpsv2", argparse.Namespace(**{**vars(hps_args), "hpsv2_checkpoint": str(tmp_path)}))
    with pytest.raises(FileNotFoundError, match="lacks HPS_v2_compressed.pt"):
        build_reward("hpsv2", argparse.Namespace(**{**vars(hps_args), "hpsv2_checkpoint": str(tmp_path),
                                                    "hpsv2_version": "v2.0"}))


# ----------------------------------------------------------------------------------------- pickscore
def test_pickscore_equals_clip_logits_per_image(rewards, pickscore_args, batch):
    """PickScore = logit_scale.exp() * cosine: transformers' own CLIPModel forward (logits_per_image) on the
    processor's outputs, image by image."""
    from transformers import AutoProcessor, CLIPModel

    processor = AutoProcessor.from_pretrained(pickscore_args.pickscore_processor)
    model = CLIPModel.from_pretrained(pickscore_args.pickscore_model).eval()
    images, prompts = batch
    expected = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts):
            inputs = processor(images=image.convert("RGB"), text=[prompt], padding=True, truncation=True,
                               max_length=77, return_tensors="pt")
            expected.append(float(model(**inputs).logits_per_image[0, 0]))
    scores = rewards["pickscore"].evaluate(images, prompts).total
    torch.testing.assert_close(scores, torch.tensor(expected), atol=ATOL, rtol=0)
    assert scores.abs().max() > 1.0  # logit scale (exp(2.66) = 14.3 here), not a bare cosine


# ----------------------------------------------------------------------------------------- aesthetic
def test_aesthetic_equals_the_laion_predictor_recipe(rewards, aesthetic_args, batch):
    """simple_inference.py of improved-aesthetic-predictor: CLIP image features, numpy L2 normalisation, the
    MLP (Linear/Dropout Sequential, loaded from the same file) in eval mode."""
    import open_clip

    head = torch.nn.Sequential(
        torch.nn.Linear(twins.TINY_CLIP_CONFIG["embed_dim"], 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16),
        torch.nn.Linear(16, 1))
    state = torch.load(Path(aesthetic_args.aesthetic_model) / "aesthetic-model.pth")
    head.load_state_dict({key.removeprefix("layers."): value for key, value in state.items()})
    head.eval()
    model, _, preprocess = open_clip.create_model_and_transforms(aesthetic_args.aesthetic_clip_model,
                                                                 pretrained=aesthetic_args.aesthetic_clip_pretrained)
    model.eval()
    images, prompts = batch
    with torch.no_grad():
        features = model.encode_image(torch.stack([preprocess(image) for image in images])).numpy()
        l2 = np.atleast_1d(np.linalg.norm(features, 2, -1))
        l2[l2 == 0] = 1
        expected = head(torch.from_numpy(features / np.expand_dims(l2, -1)).float()).squeeze(-1)
    torch.testing.assert_close(rewards["aesthetic"].evaluate(images, prompts).total, expected, atol=ATOL, rtol=0)
    # the prompt plays no part
    torch.testing.assert_close(rewards["aesthetic"].evaluate(images, ["x"] * N).total, expected, atol=ATOL, rtol=0)


def test_aesthetic_refuses_a_head_of_another_width(tmp_path, aesthetic_args):
    twins.write_aesthetic_twin(tmp_path, in_features=768)
    with pytest.raises(ValueError, match="takes 768-dim embeddings"):
        build_reward("aesthetic", argparse.Namespace(**{**vars(aesthetic_args), "aesthetic_model": str(tmp_path)}))
    torch.save({"layers.0.weight": torch.zeros(1, 1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not an aesthetic predictor"):
        build_reward("aesthetic", argparse.Namespace(**{**vars(aesthetic_args), "aesthetic_model": str(tmp_path / "bad.pth")}))


def test_clip_and_aesthetic_on_one_backbone_share_it(aesthetic_args, batch):
    mix = build_reward("clip,aesthetic:0.5", aesthetic_args)
    (clip, _), (aesthetic, _) = mix.parts
    assert clip.backbone is aesthetic.backbone  # loaded once
    out = mix.evaluate(*batch)
    torch.testing.assert_close(out.total, out.components["clip"] + 0.5 * out.components["aesthetic"])
    torch.testing.assert_close(out.components["aesthetic"], build_reward("aesthetic", aesthetic_args).evaluate(*batch).total)


def test_rewards_on_different_backbones_mix(hps_args, pickscore_args, batch):
    args = argparse.Namespace(**{**vars(hps_args), **vars(pickscore_args)})
    out = build_reward("pickscore:0.1,hpsv2", args).evaluate(*batch)
    torch.testing.assert_close(out.total, 0.1 * out.components["pickscore"] + out.components["hpsv2"])


def test_missing_weights_offline_say_what_to_do(tmp_path):
    with pytest.raises(RuntimeError, match="pass the local folder"):
        build_reward("pickscore", argparse.Namespace(pickscore_processor=str(tmp_path / "nowhere"),
                                                     pickscore_model="nobody/no-such-model"))
    with pytest.raises((RuntimeError, FileNotFoundError), match="aesthetic_model"):
        build_reward("aesthetic", argparse.Namespace(aesthetic_model="nobody/no-such-model"))


# ------------------------------------------------------------------------------------- flags registry
PLUGIN_WITH_FLAGS = '''
import torch
from reward import Reward, RewardOutput, register_reward

def flags(group):
    group.add_argument("--offset_value", type=float, default=1.0, help="what the reward adds")

def check(args):
    if args.offset_value < 0:
        raise ValueError("--offset_value must be >= 0")

class Offset(Reward):
    name = "offset"
    def __init__(self, value):
        self.value = value
    def evaluate(self, images, prompts):
        total = torch.full((len(images),), self.value)
        return RewardOutput(total=total, components={"offset": total})

@register_reward("offset", flags=flags, validate=check)
def build(args, device, dtype):
    return Offset(args.offset_value)
'''


def test_a_plugin_adds_its_own_flags_and_validation(tmp_path, monkeypatch, batch):
    monkeypatch.setattr(registry, "REWARDS", dict(registry.REWARDS))
    monkeypatch.setattr(registry, "REWARD_FLAGS", dict(registry.REWARD_FLAGS))
    monkeypatch.setattr(registry, "REWARD_VALIDATORS", dict(registry.REWARD_VALIDATORS))
    plugin = tmp_path / "offset_plugin.py"
    plugin.write_text(PLUGIN_WITH_FLAGS)
    argv = ["--reward_plugin", str(plugin), "--reward_model", "offset", "--offset_value", "2.5"]
    parser = argparse.ArgumentParser()
    add_reward_args(parser, argv)
    args = parser.parse_args(argv)
    assert args.offset_value == 2.5
    assert "--offset_value" in parser.format_help() and "reward: offset" in parser.format_help()
    assert build_reward(args.reward_model, args).evaluate(*batch).total.tolist() == [2.5] * N
    with pytest.raises(ValueError, match="--offset_value must be >= 0"):
        R.validate_reward_args(argparse.Namespace(**{**vars(args), "offset_value": -1.0}))


def test_every_reward_is_listed_in_help():
    parser = argparse.ArgumentParser()
    add_reward_args(parser, [])
    text = " ".join(parser.format_help().split())
    for name in R.REWARDS:
        assert name in text
    for flag in ("--pickscore_model", "--hpsv2_checkpoint", "--hpsv2_version", "--aesthetic_model"):
        assert flag in text


def test_a_plugin_path_that_is_no_file_or_registers_nothing_is_a_usage_error(tmp_path, capsys):
    """Both used to surface later or as a traceback: a mistyped path as FileNotFoundError from inside argparse's setup,
    a file without @register_reward (the wrong file, a forgotten decorator) only as 'unknown reward' for its name."""
    empty = tmp_path / "forgot_the_decorator.py"
    empty.write_text("def build(args, device, dtype):\n    return None\n")
    for path, message in ((tmp_path / "nope.py", "nope.py'?: no such file"), (empty, "registered no reward: decorate its builder")):
        with pytest.raises(SystemExit) as exit_info:
            add_reward_args(argparse.ArgumentParser(), ["--reward_plugin", str(path)])
        assert exit_info.value.code == 2 and re.search(message, capsys.readouterr().err)


def test_the_readme_plugin_example_runs_as_written(tmp_path, monkeypatch, batch, capsys):
    """The README's complete plugin, copied from its code block: its flag, its check, a builder named by its
    registered name; and a RewardOutput without components."""
    from conftest import ROOT

    monkeypatch.setattr(registry, "REWARDS", dict(registry.REWARDS))
    monkeypatch.setattr(registry, "REWARD_FLAGS", dict(registry.REWARD_FLAGS))
    monkeypatch.setattr(registry, "REWARD_VALIDATORS", dict(registry.REWARD_VALIDATORS))
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```python\n# my_rewards.py\n", 1)[1].split("```", 1)[0]
    (tmp_path / "my_rewards.py").write_text(block)
    argv = ["--reward_plugin", str(tmp_path / "my_rewards.py"), "--reward_model", "redness", "--redness_channel", "0"]
    parser = argparse.ArgumentParser()
    add_reward_args(parser, argv)
    args = parser.parse_args(argv)
    images, prompts = batch
    scores = R.checked_evaluate(build_reward(args.reward_model, args), images, prompts).total
    expected = [np.asarray(image.convert("RGB"), dtype=np.float32)[..., 0].mean() / 255 for image in images]
    torch.testing.assert_close(scores, torch.tensor(expected))
    with pytest.raises(ValueError, match="--redness_channel must be 0, 1 or 2"):
        R.validate_reward_args(argparse.Namespace(**{**vars(args), "redness_channel": 5}))


def test_a_reward_class_without_a_name_takes_its_registered_name(monkeypatch, batch):
    """Logs and shape errors name the reward; a class that set no name was called 'reward' in them."""
    monkeypatch.setattr(registry, "REWARDS", dict(registry.REWARDS))

    class Unnamed(R.Reward):
        def evaluate(self, images, prompts):
            return R.RewardOutput(total=torch.zeros(1))  # one score for the whole batch: refused, by name

    registry.register_reward("unnamed_test")(lambda args, device, dtype: Unnamed())
    built = build_reward("unnamed_test", None)
    with pytest.raises(ValueError, match="reward 'unnamed_test' returned total of shape"):
        R.checked_evaluate(built, *batch)
