"""Row-wise operations every model family's conditioning needs (a dataclass of tensors whose first dimension is
the batch): candidate-major repeat, row selection, row-wise choice between two conditionings, concatenation."""
from __future__ import annotations

import dataclasses

import torch


class Batched:
    """Mixin for a dataclass whose fields are all (N, ...) tensors."""

    def _fields(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def __len__(self) -> int:
        return self._fields()[0].shape[0]

    def repeat(self, n: int):
        """Candidate-major repeat: row i*B + b is prompt b's candidate i."""
        return type(self)(*(x.repeat(n, *([1] * (x.ndim - 1))) for x in self._fields()))

    def select(self, index: torch.Tensor):
        return type(self)(*(x[index.to(x.device)] for x in self._fields()))

    def where(self, keep: torch.Tensor, other):
        """Row b from self where keep[b], else from other."""
        def pick(a, b):
            return torch.where(keep.to(a.device).view(-1, *([1] * (a.ndim - 1))), a, b)

        return type(self)(*(pick(a, b) for a, b in zip(self._fields(), other._fields())))

    @classmethod
    def cat(cls, items: list):
        return cls(*(torch.cat(parts) for parts in zip(*(c._fields() for c in items))))

    def to(self, **kwargs):
        return type(self)(*(x.to(**kwargs) for x in self._fields()))

    def like(self, other):
        """Each field in the dtype of `other`'s same field: a CFG negative branch matches the positive one field by field
        (casting every field to the embeddings' bf16 rounded FLUX's embedded guidance, 3.3 -> 3.296875)."""
        return type(self)(*(x.to(dtype=y.dtype) for x, y in zip(self._fields(), other._fields())))
