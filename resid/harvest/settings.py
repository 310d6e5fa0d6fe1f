"""What a harvest is asked to do, checked once: a frozen :class:`Settings`.

Every number that sizes an allocation (``k``, the window, the batch, the context) is
bounded here, before anything is written or allocated, and the same checks read a
harvest's manifest back (:meth:`Settings.from_record`): a tampered manifest is a
:class:`HarvestError`, never a traceback from deep inside a run.

>>> s = Settings(sites=("blocks.5.mlp.hook_post",), k=16, window=(12, 4))
>>> s.record()["window"]
[12, 4]
>>> Settings(sites=("blocks.5.mlp.hook_post",), k=10**9)
Traceback (most recent call last):
HarvestError: --k must be an int in [1, 65536], not 1000000000
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from resid.harvest.errors import HarvestError
from resid.harvest.stats import N_BINS

MAX_K = 1 << 16
MAX_WINDOW = 4096  # tokens each side of a top token
MAX_CONTEXT = 1 << 20  # tokens; a model's n_ctx bounds it further
MAX_BATCH = 1 << 16
MAX_SHARD_BATCHES = 1 << 20
MAX_TOKENS = 1 << 53
MAX_SITES = 4096
MAX_STATE_BYTES = 8 << 30  # the running statistics of every site together
STORE_DTYPES = ("float32", "float16", "bfloat16", "float64")
MODES = ("concat", "rows")


def _int(name: str, value: object, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise HarvestError(f"--{name} must be an int in [{lo}, {hi}], not {value!r}")
    return value


def _bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise HarvestError(f"{name} must be true or false, not {value!r}")
    return value


def parse_window(text: str | tuple | list) -> tuple[int, int]:
    """``"12,4"`` (or ``(12, 4)``) as ``(tokens before, tokens after)``, each an int >= 0
    (bounded by :class:`Settings`).

    >>> parse_window("12,4")
    (12, 4)
    """
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != 2 or not all(p.isdigit() and len(p) <= 9 for p in parts):
            raise HarvestError(
                f"--window takes two whole numbers 'before,after' (tokens shown around each "
                f"top token), e.g. 12,4; not {text[:40]!r}"
            )
        return int(parts[0]), int(parts[1])
    if (
        not isinstance(text, (tuple, list))
        or len(text) != 2
        or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in text)
    ):
        raise HarvestError(
            f"--window is (tokens before, tokens after), two ints >= 0, not {text!r}"
        )
    return int(text[0]), int(text[1])


@dataclass(frozen=True)
class Settings:
    """A harvest's settings, validated on construction (:class:`HarvestError` names the
    setting as its command-line flag). ``context_length`` is checked against the model's
    ``n_ctx`` by :meth:`for_model`.

    >>> Settings(sites=("blocks.0.hook_resid_post",), activations=True, max_tokens=10_000)
    """

    sites: tuple[str, ...]
    stats: bool = True
    activations: bool = False
    context_length: int = 128
    mode: str = "concat"
    batch_size: int = 8
    shard_batches: int = 16
    max_tokens: int | None = None
    store_dtype: str = "float32"
    k: int = 16
    window: tuple[int, int] = (12, 4)
    active_threshold: float = 0.0
    exclude_bos: bool = False

    def __post_init__(self) -> None:
        sites = self.sites
        if isinstance(sites, str) or not isinstance(sites, (tuple, list)):
            raise HarvestError(f"sites must be a list of hook names, not {sites!r}")
        if not sites or len(sites) > MAX_SITES or not all(isinstance(s, str) and s for s in sites):
            raise HarvestError(f"give 1 to {MAX_SITES} hook names as sites, not {sites!r}")
        if len(set(sites)) != len(sites):
            raise HarvestError(f"a site is listed twice: {list(sites)}")
        object.__setattr__(self, "sites", tuple(sites))
        _bool("stats", self.stats)
        _bool("activations", self.activations)
        _bool("exclude_bos", self.exclude_bos)
        if not (self.stats or self.activations):
            raise HarvestError("nothing to harvest: ask for statistics, activations or both")
        _int("context-length", self.context_length, 2, MAX_CONTEXT)
        if self.mode not in MODES:
            raise HarvestError(f"--mode must be 'concat' or 'rows', not {self.mode!r}")
        _int("batch-size", self.batch_size, 1, MAX_BATCH)
        _int("shard-batches", self.shard_batches, 1, MAX_SHARD_BATCHES)
        if self.max_tokens is not None:
            _int("max-tokens", self.max_tokens, 1, MAX_TOKENS)
        if self.store_dtype not in STORE_DTYPES:
            raise HarvestError(
                f"--store-dtype must be one of {', '.join(STORE_DTYPES)}, not {self.store_dtype!r}"
            )
        _int("k", self.k, 1, MAX_K)
        window = parse_window(self.window)
        if max(window) > MAX_WINDOW:
            raise HarvestError(
                f"--window {window[0]},{window[1]} is wider than resid keeps: each side is at "
                f"most {MAX_WINDOW} tokens (a context here has {self.context_length})"
            )
        object.__setattr__(self, "window", window)
        t = self.active_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            raise HarvestError(f"--active-threshold must be a finite number, not {t!r}")
        object.__setattr__(self, "active_threshold", float(t))

    def for_model(self, n_ctx: int) -> Settings:
        """Self, checked against a model's context length ``n_ctx``."""
        if self.context_length > n_ctx:
            raise HarvestError(
                f"--context-length {self.context_length} is longer than the model's "
                f"context ({n_ctx} tokens)"
            )
        return self

    def state_bytes(self, units: dict[str, int]) -> int:
        """Bytes the running statistics take for sites of ``units`` units each (top-k with
        windows, histograms and moments), before any is allocated."""
        if not self.stats:
            return 0
        w = sum(self.window) + 1
        per_unit = self.k * (4 + 8 + w * (8 + 4)) + N_BINS * 8 + 5 * 8
        return sum(u * per_unit for u in units.values())

    def check_memory(self, units: dict[str, int], limit: int = MAX_STATE_BYTES) -> None:
        """Refuse settings whose statistics would need more than ``limit`` bytes."""
        need = self.state_bytes(units)
        if need > limit:
            raise HarvestError(
                f"--k {self.k} with --window {self.window[0]},{self.window[1]} over "
                f"{sum(units.values()):,} units needs {need / 2**30:.1f} GiB of statistics "
                f"(resid allows {limit / 2**30:.0f} GiB): lower --k or --window, or harvest "
                "fewer sites at a time"
            )

    def record(self) -> dict[str, Any]:
        """The settings as a manifest stores them (JSON types: lists, not tuples)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["sites"] = list(self.sites)
        out["window"] = list(self.window)
        return out

    @classmethod
    def from_record(cls, record: object, where: str = "the manifest") -> Settings:
        """Settings read back from a manifest's ``harvest`` record, checked as on the
        command line; anything missing, mistyped or out of range is a :class:`HarvestError`
        naming ``where``."""
        if not isinstance(record, dict):
            raise HarvestError(f"{where} has no harvest record")
        try:
            values = {f.name: record[f.name] for f in fields(cls)}
            sites = values["sites"]
            values["sites"] = tuple(sites) if isinstance(sites, list) else sites
            return cls(**values)
        except KeyError as e:
            raise HarvestError(f"{where} is damaged: its harvest record has no {e}") from None
        except HarvestError as e:
            raise HarvestError(f"{where} is damaged: {e}") from None

    def differences(self, other: Settings) -> list[str]:
        """``"name: was A, now B"`` for every setting that differs from ``other``'s."""
        return [
            f"{f.name}: was {getattr(other, f.name)!r}, now {getattr(self, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]
