"""ActivationCache: what ``run_with_cache`` kept, by hook name, and nothing else.

>>> logits, cache = model.run_with_cache("Hello world")
>>> cache["blocks.0.hook_resid_pre"].shape
torch.Size([1, 3, 768])
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from torch import Tensor

from resid.hooks import unknown_hook_error

if TYPE_CHECKING:
    from resid.model import Model


class ActivationCache(Mapping[str, Tensor]):
    def __init__(self, store: dict[str, Tensor], model: Model):
        self._store = store
        self.model = model

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._store:
            if name in self.model.hook_dict:
                raise KeyError(f"'{name}' was not cached: add it to run_with_cache's names_filter")
            raise unknown_hook_error(name, self.model.hook_dict)
        return self._store[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._store)

    def __len__(self) -> int:
        return len(self._store)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} sites: {', '.join(list(self)[:4])}{', …' if len(self) > 4 else ''})"

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached tensors."""
        return sum(t.numel() * t.element_size() for t in self._store.values())
