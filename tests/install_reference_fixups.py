"""Make the test-only reference packages importable (run by `make install` after requirements-reference.txt).

The hpsv2 1.2.0 wheel omits the CLIP BPE vocabulary its vendored open_clip loads at import time; it is the same
file open_clip ships (OpenAI's bpe_simple_vocab_16e6.txt.gz), so it is copied from there.
"""
import importlib.util
import shutil
from pathlib import Path

VOCAB = "bpe_simple_vocab_16e6.txt.gz"

open_clip_spec = importlib.util.find_spec("open_clip")
hpsv2_spec = importlib.util.find_spec("hpsv2")
if open_clip_spec and hpsv2_spec:
    target = Path(hpsv2_spec.origin).parent / "src" / "open_clip" / VOCAB
    if not target.exists():
        shutil.copyfile(Path(open_clip_spec.origin).parent / VOCAB, target)
        print(f"copied {VOCAB} into {target.parent}")
