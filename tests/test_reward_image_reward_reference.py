"""Our ImageReward (transformers' BLIP classes) against the reference implementation, PyPI `image-reward==1.5`.

The reference is built with tiny random weights, its state dict is saved as a fake ImageReward.pt, our
loader reads that file, and both score the same images and prompts. The package does not import with
transformers 5, so this test (and only this test) shims it:
- its package __init__ files are skipped: they import OpenAI's `clip` package (for CLIPScore/Aesthetic)
  and the ReFL training stack, neither of which the ImageReward model uses;
- helpers removed from transformers.modeling_utils are put back from transformers.pytorch_utils
  (apply_chunking_to_forward, prune_linear_layer) or stubbed (find_pruneable_heads_and_indices: pruning only);
- its BertModel gets v4's invert_attention_mask / get_head_mask, and its v4-style init_weights() call
  (v5 needs post_init) becomes a no-op: every weight is overwritten below anyway;
- BertTokenizer.from_pretrained('bert-base-uncased') is redirected to a local tiny vocab (no hub), with
  v4's additional_special_tokens_ids so its init_tokenizer runs unchanged;
- create_vit('large') returns the package's own VisionTransformer at test size, and the MLP(768) head
  (BERT-base width) is rebuilt with the package's MLP class at the tiny text width.
Install: pip install --no-deps -r requirements-reference.txt
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import reward_twins as twins  # noqa: E402
from reward import build_reward  # noqa: E402

_SPEC = importlib.util.find_spec("ImageReward")
pytestmark = pytest.mark.skipif(
    _SPEC is None, reason="reference package missing: pip install --no-deps -r requirements-reference.txt")


def _invert_attention_mask(self, mask: torch.Tensor) -> torch.Tensor:
    """transformers 4's ModuleUtilsMixin.invert_attention_mask (removed in 5)."""
    mask = mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]
    mask = mask.to(dtype=self.dtype)
    return (1.0 - mask) * torch.finfo(self.dtype).min


def _no_pruning(*args, **kwargs):
    raise NotImplementedError("head pruning is not used by ImageReward")


@pytest.fixture
def reference(monkeypatch, tmp_path):
    """The package's ImageReward module, importable under transformers 5 for the duration of one test."""
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils
    from transformers import BertTokenizer

    package_dir = Path(list(_SPEC.submodule_search_locations)[0])
    before = {name for name in sys.modules if name == "ImageReward" or name.startswith("ImageReward.")}
    for name in before:
        monkeypatch.delitem(sys.modules, name)
    for name, path in (("ImageReward", package_dir), ("ImageReward.models", package_dir / "models")):
        stub = types.ModuleType(name)
        stub.__path__ = [str(path)]
        monkeypatch.setitem(sys.modules, name, stub)

    for name, value in (("apply_chunking_to_forward", pytorch_utils.apply_chunking_to_forward),
                        ("prune_linear_layer", pytorch_utils.prune_linear_layer),
                        ("find_pruneable_heads_and_indices", _no_pruning)):
        monkeypatch.setattr(modeling_utils, name, value, raising=False)

    med = importlib.import_module("ImageReward.models.BLIP.med")
    monkeypatch.setattr(med.BertModel, "init_weights", lambda self: None)
    monkeypatch.setattr(med.BertModel, "invert_attention_mask", _invert_attention_mask, raising=False)
    monkeypatch.setattr(med.BertModel, "get_head_mask", lambda self, head_mask, n: [None] * n, raising=False)

    vocab_dir = twins.write_bert_vocab(tmp_path / "bert-vocab")

    class V4CompatTokenizer(BertTokenizer):
        @property
        def additional_special_tokens_ids(self) -> list[int]:
            return [self.convert_tokens_to_ids(str(token)) for token in self._extra_special_tokens]

    class LocalBertTokenizer:
        @staticmethod
        def from_pretrained(name: str, *args, **kwargs):
            assert name == "bert-base-uncased", name
            return V4CompatTokenizer.from_pretrained(str(vocab_dir))

    blip = importlib.import_module("ImageReward.models.BLIP.blip")
    monkeypatch.setattr(blip, "BertTokenizer", LocalBertTokenizer)
    vit = importlib.import_module("ImageReward.models.BLIP.vit")
    blip_pretrain = importlib.import_module("ImageReward.models.BLIP.blip_pretrain")
    v = twins.TINY_VISION

    def tiny_vit(name, image_size, *args, **kwargs):
        assert name == "large" and image_size == 224
        encoder = vit.VisionTransformer(img_size=image_size, patch_size=v["patch"], embed_dim=v["width"],
                                        depth=v["depth"], num_heads=v["width"] // 64, mlp_ratio=v["mlp"] / v["width"])
        return encoder, v["width"]

    monkeypatch.setattr(blip_pretrain, "create_vit", tiny_vit)
    module = importlib.import_module("ImageReward.ImageReward")
    module.vocab_dir = vocab_dir
    yield module
    for name in [n for n in sys.modules if n == "ImageReward" or n.startswith("ImageReward.")]:
        if name not in before:
            sys.modules.pop(name, None)


def _reference_model(reference, folder: Path, seed: int):
    med = twins.tiny_med_config()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "med_config.json").write_text(json.dumps(med))
    model = reference.ImageReward(med_config=str(folder / "med_config.json"), device="cpu")
    model.mlp = reference.MLP(med["hidden_size"])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            tensor.copy_(twins.expressive_init(name, tuple(tensor.shape), generator))
    return model.eval()


def test_reference_layout_matches_twin_layout(reference, tmp_path):
    """The random checkpoints test_reward.py builds have exactly the reference's keys and shapes."""
    model = _reference_model(reference, tmp_path, seed=0)
    ours = twins.image_reward_shapes(twins.tiny_med_config())
    theirs = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert theirs == ours


def test_scores_match_reference_implementation(reference, tmp_path):
    model = _reference_model(reference, tmp_path / "ckpt", seed=7)
    torch.save(model.state_dict(), tmp_path / "ckpt" / "ImageReward.pt")

    images = twins.sample_images(6, seed=3, size=(300, 260))
    images[1] = images[1].convert("L")  # grayscale and RGBA (index 3) go through the same conversion
    prompts = twins.sample_prompts(6)
    prompts[2] = " ".join(["a fluffy red cat sitting on a wooden house"] * 8)  # > 35 tokens: truncated
    prompts[4] = "Zebra-like UNKNOWN words, Shiny!"

    ours_reward = build_reward("image_reward", argparse.Namespace(
        image_reward_model=str(tmp_path / "ckpt"), image_reward_tokenizer=str(reference.vocab_dir),
        reward_batch_size=4))
    ours = ours_reward.evaluate(images, prompts).total

    with torch.no_grad():
        theirs = torch.tensor([model.score(prompt, image) for image, prompt in zip(images, prompts)])
        _, ranked = model.inference_rank(prompts[0], images)  # the package's batched path, one prompt
    ours_same_prompt = ours_reward.evaluate(images, [prompts[0]] * len(images)).total

    print("ours  ", ours.tolist())
    print("theirs", theirs.tolist())
    assert theirs.std() > 0.1, "scores barely differ: the comparison would prove nothing"
    torch.testing.assert_close(ours, theirs.float(), atol=1e-4, rtol=0)
    torch.testing.assert_close(ours_same_prompt, torch.tensor(ranked, dtype=torch.float32), atol=1e-4, rtol=0)


def test_module_prefixed_checkpoint_matches_reference(reference, tmp_path):
    """IterComp saves the same model from DDP ('module.' prefix); the scores must not change."""
    model = _reference_model(reference, tmp_path / "ckpt", seed=11)
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "ckpt" / "ImageReward.pt")
    images, prompts = twins.sample_images(3, seed=5), twins.sample_prompts(3)
    ours = build_reward("image_reward", argparse.Namespace(
        image_reward_model=str(tmp_path / "ckpt" / "ImageReward.pt"),
        image_reward_tokenizer=str(reference.vocab_dir))).evaluate(images, prompts).total
    with torch.no_grad():
        theirs = torch.tensor([model.score(p, i) for i, p in zip(images, prompts)], dtype=torch.float32)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
