"""The harvest run: a model over a corpus, its sites' statistics and activations written to
a folder, on one process or many (``torchrun``), killable at any instant and resumable.

>>> harvest(model, "corpus.txt", "h", sites=["blocks.5.mlp.hook_post"], max_tokens=10**6)
>>> harvest(model, "corpus.txt", "h", sites=["blocks.5.mlp.hook_post"], resume=True)

The corpus is cut into contexts (:mod:`resid.harvest.corpus`), contexts into batches of
``batch_size``, and batches into chunks of ``shard_batches`` batches. Chunk ``c`` is run by
rank ``c % world_size``, always as the same batches, so every shard is bit-identical
whatever the number of processes, and the statistics differ only by float64 rounding in
the order of the merges. Each finished chunk commits its shard and then the rank's running
statistics (:mod:`resid.harvest.store`), so a run killed at any moment resumes from its
last committed chunk and ends identical to an uninterrupted run. Rank 0 merges the ranks'
statistics (:mod:`resid.harvest.distributed`) and writes them with the final manifest.

Everything a run is asked is checked first (:class:`~resid.harvest.settings.Settings`, the
sites against the model, the statistics' memory against a bound, the corpus giving a
context), before the folder is touched.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import safetensors.torch
import torch
from torch import Tensor
from tqdm import tqdm

from resid.core import files, names
from resid.harvest import distributed as D
from resid.harvest import store
from resid.harvest.batches import batches, chunks
from resid.harvest.corpus import Corpus, Mode, contexts, open_corpus
from resid.harvest.errors import HarvestError
from resid.harvest.settings import Settings
from resid.harvest.stats import UnitStats

if TYPE_CHECKING:
    from resid.core.model import Model

_IDENTITY_CHANGE_OK = ("model", "corpus")  # paths may be spelled differently on resume


# ---- sites ---------------------------------------------------------------------------------


def check_sites(model: Model, sites: Sequence[str] | str) -> list[str]:
    """The site names, checked against ``model.hook_dict`` now (SAE sites spliced in by an
    enclosing ``with model.saes(...)`` count), each one vector per token."""
    if isinstance(sites, str):
        sites = [s for s in sites.split(",") if s.strip()]
    sites = [s.strip() if isinstance(s, str) else s for s in sites]
    if not sites:
        raise HarvestError("give at least one site, e.g. blocks.5.mlp.hook_post")
    for s in sites:
        if not isinstance(s, str) or s not in model.hook_dict:
            close = difflib.get_close_matches(str(s), model.hook_names, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise HarvestError(
                f"no hook site {s!r} in this model{hint} (resid info MODEL lists them)"
            )
        site = names.info(s)
        if site is not None and not site.per_token:
            raise HarvestError(
                f"{s} is [{', '.join(site.axes)}], not one vector per token: harvest a "
                "per-token site (e.g. blocks.L.attn.hook_z or blocks.L.hook_attn_out)"
            )
    return sites


def stop_layer(sites: Sequence[str]) -> int | None:
    """The layer after which nothing the sites need is computed (None: run everything)."""
    last = -1
    for s in sites:
        p = names.parse(s)
        if p is None:
            return None
        if p.layer is None:
            if p.site.short in ("embed", "pos_embed"):
                continue
            return None  # after the blocks
        last = max(last, p.layer)
    return last + 1


def site_units(model: Model, sites: Sequence[str], tokens: list[int]) -> dict[str, int]:
    """Each site's units (the width of its per-token vector): from the hook-site table,
    or, for sites it does not describe (a spliced SAE's), from a two-token forward."""
    units = {s: names.width(s, model.cfg) for s in sites}
    unknown = [s for s, u in units.items() if u is None]
    if unknown:
        got = _forward(
            model, unknown, torch.tensor([tokens[:2]]), torch.ones(1, 2, dtype=torch.bool)
        )
        units.update({s: a.shape[-1] for s, a in got.items()})
    return units  # type: ignore[return-value]


def _forward(model: Model, sites: Sequence[str], tokens: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """The sites' activations ``[batch, pos, units]`` on one batch (the model stops after
    the last layer a site needs); hooks the caller attached apply."""
    got: dict[str, Tensor] = {}

    def grab(act: Tensor, hook) -> None:
        got[hook.name] = act

    device = model.device
    mask = mask.to(device)
    kwargs = {"attention_mask": mask if not bool(mask.all()) else None}
    stop = stop_layer(sites)
    with torch.no_grad(), model.hooks([(s, grab) for s in sites]):
        if stop is not None:
            model(tokens.to(device), stop_at_layer=stop, **kwargs)
        else:
            model(tokens.to(device), return_type=None, **kwargs)
    missing = [s for s in sites if s not in got]
    if missing:
        raise HarvestError(f"the sites {missing} did not run in the forward pass")
    b, p = tokens.shape
    out = {}
    for s in sites:
        act = got[s]
        if act.dim() < 2 or tuple(act.shape[:2]) != (b, p):
            raise HarvestError(
                f"{s} gave shape {tuple(act.shape)}, not [batch, pos, ...]: not a per-token site"
            )
        out[s] = act.reshape(b, p, -1)
    return out


# ---- the run's identity --------------------------------------------------------------------


def model_fingerprint(model: Model) -> str:
    """SHA-256 over every parameter's name, shape, dtype and a strided sample of its values."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)][:4096].float().cpu()
            digest.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def model_label(label: str | None, model: Model) -> str:
    """What the manifest records as the model: ``label`` (or the model's own name), made
    absolute when it names a local path, so ``resid dashboard`` finds it from any folder."""
    label = label or str(getattr(model, "name_or_path", "model"))
    try:
        path = Path(label).expanduser()
        return str(path.resolve()) if path.exists() else label
    except (OSError, RuntimeError, ValueError):  # not a path this system can even look up
        return label


def _identity(model: Model, corpus: Corpus, label: str) -> dict:
    """What the run is of (model, corpus, their fingerprints), as JSON gives it back."""
    return _as_json(
        {
            "version": store.VERSION,
            "model": label,
            "model_fingerprint": model_fingerprint(model),
            "model_config": model.cfg.to_dict(),
            "model_dtype": str(model.dtype).removeprefix("torch."),
            "corpus": str(corpus.path),
            "corpus_kind": corpus.kind,
            "corpus_fingerprint": corpus.fingerprint(),
            "text_field": corpus.text_field,
            "split": corpus.split,
            "histogram": "signed, 4 bins an octave, 2^-12 to 2^12",
        }
    )


def _as_json(value):
    """``value`` as a JSON round trip returns it (tuples become lists), so a record read
    back from a manifest compares equal to the one written."""
    return json.loads(json.dumps(value))


def _check_resume(old: dict, settings: Settings, identity: dict, world: int, out: Path) -> None:
    """Refuse a resume whose settings, model, corpus or number of processes differ."""
    before = Settings.from_record(old, f"the manifest of {out}")
    if old.get("world_size") != world:
        raise HarvestError(
            f"this harvest was started with {old.get('world_size')!r} process(es) and is being "
            f"resumed with {world}: each rank resumes its own slice, so resume with "
            f"--nproc-per-node/--nnodes giving {old.get('world_size')!r} processes"
        )
    diffs = settings.differences(before)
    for key, now in identity.items():
        was = old.get(key)
        if key in _IDENTITY_CHANGE_OK or was == now:
            continue
        if isinstance(was, dict) and isinstance(now, dict):  # the model's config, field by field
            # a field only one side has is a field one resid version did not know: no change
            diffs += [f"{key}.{f}: was {was[f]!r}, now {now[f]!r}"
                      for f in sorted(set(was) & set(now), key=str) if was[f] != now[f]]  # fmt: skip
        else:
            diffs.append(f"{key}: was {str(was)[:60]!r}, now {str(now)[:60]!r}")
    if diffs:
        raise HarvestError(
            f"--resume with different settings ({'; '.join(diffs[:6])}): resume with the "
            "original command, or harvest to a new folder"
        )
    if not isinstance(old.get("run_id"), str) or not old["run_id"]:
        raise HarvestError(f"the manifest of {out} is damaged: it has no run_id")


def _decide(out: Path, settings: Settings, identity: dict, world: int, resume: bool) -> dict:
    """Rank 0's verdict on the output folder: ``{"action": "fresh" | "resume" | "done"}``
    (with the ``run_id`` to go on with) or ``{"error": message}``."""
    try:
        if out.exists() and not out.is_dir():
            return {"error": f"{out} exists and is not a folder: choose another --out"}
        if store.only_a_first_manifest(out):  # killed before the run's first commit
            store.remove_temporaries(out)
        if not out.exists() or not any(out.iterdir()):
            if resume:  # a run killed before it wrote anything: resuming is starting
                print(f"resid harvest: nothing to resume in {out}: starting", file=sys.stderr)
            return {"action": "fresh"}
        manifest = store.read_manifest(out)
        foreign = store.foreign_files(out)
        if manifest is None or foreign:
            what = files.describe(foreign) if foreign else "no resid harvest manifest"
            return {"error": (f"{out} holds files that resid harvest did not write ({what}): "
                              "resid never replaces them; choose another --out")}  # fmt: skip
        old = manifest["harvest"]
        status = old.get("status")
        if status not in ("running", "complete"):
            return {"error": f"the manifest of {out} is damaged: status is {status!r}"}
        if not resume:
            if status == "complete":
                return {"error": f"{out} holds a finished harvest; resid never deletes one: "
                                 "choose another --out, or delete it yourself"}  # fmt: skip
            return {"error": f"{out} holds an interrupted harvest: pass --resume to finish it "
                             "(with the same settings and number of processes), or choose another --out"}  # fmt: skip
        _check_resume(old, settings, identity, world, out)
        if status == "complete":
            store.read_harvest(out)  # a complete record must hold up
            return {"action": "done", "run_id": old["run_id"]}
        store.remove_temporaries(out)
        return {"action": "resume", "run_id": old["run_id"]}
    except (HarvestError, files.UnsafePathError) as e:
        return {"error": str(e)}


# ---- the run ------------------------------------------------------------------------------------


def harvest(
    model: Model,
    corpus: str | Path | Corpus,
    out: str | Path,
    sites: Sequence[str] | str,
    *,
    stats: bool = True,
    activations: bool = False,
    context_length: int | None = None,
    mode: Mode = "concat",
    batch_size: int = 8,
    shard_batches: int = 16,
    max_tokens: int | None = None,
    store_dtype: torch.dtype | None = None,
    k: int = 16,
    window: tuple[int, int] | str = (12, 4),
    active_threshold: float = 0.0,
    exclude_bos: bool = False,
    text_field: str = "text",
    split: str | None = None,
    resume: bool = False,
    progress: bool = True,
    log: bool = False,
    label: str | None = None,
) -> Path:
    """Run ``model`` over ``corpus`` and write what the sites did to the folder ``out``.

    ``sites``: hook names (a list, or a comma-separated string). ``stats``: per-unit
    statistics to ``out/stats/SITE.safetensors``; ``activations``: every real token's
    activations to ``out/shards/`` in ``store_dtype`` (default: the model's). Contexts of
    ``context_length`` tokens (default 128, or ``n_ctx`` if shorter; ``mode`` "concat" or
    "rows", see :mod:`resid.harvest.corpus`), in batches of ``batch_size``;
    ``shard_batches`` batches make a chunk, the unit of work split across ranks and of
    resumption. ``max_tokens`` stops after the context that reaches it. ``k`` top tokens a
    unit, each with ``window`` (before, after) tokens around it. ``exclude_bos`` leaves
    ``<|endoftext|>`` tokens out of statistics and shards. ``label`` names the model in the
    manifest (a local path is recorded absolute).

    Under ``torchrun`` (or any initialised process group) each rank runs its chunks and
    rank 0 merges; call it on every rank. Hooks attached around the call apply.

    >>> harvest(model, "wiki.txt", "h", ["blocks.5.mlp.hook_post"], max_tokens=1_000_000)
    >>> harvest(model, "wiki.txt", "h", ["blocks.5.mlp.hook_post"], resume=True)  # after a kill
    """
    rank, world = D.rank_and_world()
    sites = check_sites(model, sites)
    store_dtype = store_dtype or model.dtype
    if not isinstance(store_dtype, torch.dtype) or not store_dtype.is_floating_point:
        raise HarvestError(f"store_dtype must be a float dtype, not {store_dtype}")
    settings = Settings(
        sites=tuple(sites), stats=stats, activations=activations,
        context_length=min(128, model.cfg.n_ctx) if context_length is None else context_length,
        mode=mode, batch_size=batch_size, shard_batches=shard_batches, max_tokens=max_tokens,
        store_dtype=str(store_dtype).removeprefix("torch."), k=k, window=window,
        active_threshold=active_threshold, exclude_bos=exclude_bos,
    ).for_model(model.cfg.n_ctx)  # fmt: skip
    corpus = corpus if isinstance(corpus, Corpus) else open_corpus(corpus, text_field, split)

    # the corpus must give a context, and the statistics must fit, before anything is written
    first = next(contexts(corpus, model.tokenizer, settings.context_length, settings.mode), None)
    if first is None:
        raise HarvestError(
            f"the corpus {corpus.path} gives no context: it is empty, or shorter than one "
            f"context of {settings.context_length} tokens (use a shorter --context-length or "
            "--mode rows)"
        )
    units = site_units(model, sites, first[0])
    settings.check_memory(units)
    identity = _identity(model, corpus, model_label(label, model))
    out = files.target(out)

    verdict = D.broadcast(
        _decide(out, settings, identity, world, resume) if rank == 0 else None, rank, world
    )
    if "error" in verdict:
        raise HarvestError(verdict["error"])
    record = {**identity, **settings.record()}
    if verdict["action"] == "fresh":
        run_id = uuid.uuid4().hex
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            store.write_manifest(
                out, {**record, "run_id": run_id, "world_size": world, "status": "running"}, {}
            )
        run_id = D.broadcast(run_id, rank, world)
    else:
        run_id = verdict["run_id"]
    D.barrier(world)
    manifest = store.read_manifest(out)
    if manifest is None or manifest["harvest"].get("run_id") != run_id:
        raise HarvestError(
            f"rank {rank} cannot see {out / files.MANIFEST} that rank 0 wrote: every rank must "
            "write to a folder on a filesystem they all share"
        )
    if verdict["action"] == "done":
        if rank == 0:
            store.cleanup_ranks(out, run_id)
            print(f"resid harvest: {out} is already complete", file=sys.stderr)
        D.barrier(world)
        return out
    for sub in store.SUBFOLDERS:
        (out / sub).mkdir(exist_ok=True)
    runner = Runner(model, corpus, out, settings, record, run_id, rank, world, store_dtype)
    runner.run(progress=progress and rank == 0, log=log)
    return out


class Runner:
    """One rank's part of a harvest: its chunks, its committed state, and (rank 0) the merge.

    ``record`` is what the manifest says of the run (settings and identity); ``run_id``
    tags every file this run writes, so a resume knows its own.

    >>> Runner(model, corpus, out, settings, record, run_id, 0, 1, torch.float32).run()
    """

    def __init__(self, model: Model, corpus: Corpus, out: Path, settings: Settings, record: dict,
                 run_id: str, rank: int, world: int, store_dtype: torch.dtype):  # fmt: skip
        self.model, self.corpus, self.out, self.settings = model, corpus, out, settings
        self.record, self.run_id, self.rank, self.world = record, run_id, rank, world
        self.store_dtype = store_dtype
        self.state_rel = store.rank_path(rank)
        self.done: list[int] = []
        self.shards: dict[str, dict] = {}  # rel path -> {"chunk", "rows", "sha256"}
        self.tokens = 0  # real tokens this rank harvested
        self.stats: dict[str, UnitStats] = {}
        self.bos = model.tokenizer.bos_token_id

    # -- committed state of this rank --

    def load(self) -> None:
        """Pick up this rank's last commit (nothing if it has none), checking that every
        shard it lists is still the one it wrote."""
        path = self.out / self.state_rel
        if not path.exists():
            return
        state = store.rank_state(self.out, self.state_rel, self.run_id)
        if state is None:
            raise HarvestError(f"{path} is not this harvest's rank {self.rank} state")
        for rel, digest in state["files"].items():
            target = files.inside(self.out, rel)
            try:
                ok = files.sha256(target) == digest
            except (OSError, ValueError):
                ok = False
            if not ok:
                raise HarvestError(
                    f"{target} is missing or changed since this harvest wrote it: the run "
                    "cannot resume exactly; harvest to a new folder"
                )
        self.done, self.shards, self.tokens = state["done"], state["shards"], state["tokens"]
        if self.settings.stats:
            s = self.settings
            try:
                tensors = safetensors.torch.load(files.read_regular(path, 1 << 40))
                for site in s.sites:
                    if f"{site}/count" in tensors:
                        self.stats[site] = UnitStats.from_state(
                            tensors, f"{site}/", s.k, s.window, s.active_threshold
                        )
            except Exception as e:  # safetensors' errors, and from_state's ValueError
                raise HarvestError(f"{path} does not hold this harvest's statistics: {e}") from None

    def commit(self) -> None:
        """Write this rank's state (statistics so far, chunks done, shards written) whole."""
        tensors = {}
        for site, st in self.stats.items():
            tensors.update(st.state(f"{site}/"))
        if not tensors:
            tensors = {"none": torch.zeros(0)}
        listed = {rel: info["sha256"] for rel, info in self.shards.items()}
        meta = {"writer": store.WRITER, "run_id": self.run_id, "rank": str(self.rank),
                "done": json.dumps(self.done), "shards": json.dumps(self.shards),
                "files": json.dumps(listed), "tokens": str(self.tokens)}  # fmt: skip
        store.save_tensors(self.out, self.state_rel, tensors, meta)

    # -- work --

    def chunk(self, number: int, contexts_: list[list[int]]) -> int:
        """Run chunk ``number``: statistics updated, its shard written, the rank's state
        committed. Returns the real tokens it held."""
        s = self.settings
        rows_tokens, rows_index, rows_acts = [], [], {site: [] for site in s.sites}
        n_real = 0
        for batch in batches(contexts_, number, s, self.model.tokenizer.pad_token_id):
            acts = _forward(self.model, s.sites, batch.tokens, batch.mask)
            mask = batch.mask
            if s.exclude_bos:
                mask = mask & (batch.tokens != self.bos)
            n_real += int(mask.sum())
            dev_mask = mask.to(self.model.device)
            for site, a in acts.items():
                if s.stats:
                    if site not in self.stats:
                        self.stats[site] = UnitStats(a.shape[-1], s.k, s.window, s.active_threshold)
                    self.stats[site].update(
                        a, batch.tokens.to(a.device), dev_mask, batch.index.to(a.device)
                    )
                if s.activations:
                    rows_acts[site].append(a[dev_mask].to("cpu", self.store_dtype))
            if s.activations:
                rows_tokens.append(batch.tokens[mask].to(torch.int32))
                rows_index.append(batch.index[mask])
        if s.activations:
            rel = store.shard_path(number)
            tensors = {site: torch.cat(v) for site, v in rows_acts.items()}
            tensors["tokens"] = torch.cat(rows_tokens)
            tensors["index"] = torch.cat(rows_index)
            meta = {"writer": store.WRITER, "run_id": self.run_id, "chunk": str(number)}
            digest = store.save_tensors(self.out, rel, tensors, meta)
            self.shards[rel] = {"chunk": number, "rows": n_real, "sha256": digest}
        self.tokens += n_real
        self.done.append(number)
        self.commit()
        return n_real

    def run(self, progress: bool = False, log: bool = False) -> None:
        """Run this rank's chunks not yet committed, then merge and write the result."""
        self.load()
        done = set(self.done)
        limit = self.settings.max_tokens
        bar = tqdm(total=limit, unit="tok", unit_scale=True, desc="harvest", disable=not progress,
                   file=sys.stderr, dynamic_ncols=True, smoothing=0.1)  # fmt: skip
        bar.update(self.tokens * self.world)
        n_chunks, total_tokens = 0, 0
        started = time.monotonic()
        try:
            for number, chunk, fraction in chunks(self.corpus, self.model, self.settings):
                n_chunks = number + 1
                total_tokens += sum(map(len, chunk))
                if number % self.world != self.rank or number in done:
                    continue
                n = self.chunk(number, chunk)
                if log:
                    print(f"resid harvest: rank {self.rank} committed chunk {number} ({n} tokens)",
                          file=sys.stderr, flush=True)  # fmt: skip
                if progress:
                    if limit is None and fraction > 0:
                        bar.total = max(int(total_tokens / fraction), bar.n + n * self.world)
                    bar.update(n * self.world)
        finally:
            bar.close()
        self.finish(n_chunks, time.monotonic() - started)

    def finish(self, n_chunks: int, seconds: float) -> None:
        """Gather every rank's state on rank 0, which writes the merged result."""
        mine = {"stats": {s: st.state() for s, st in self.stats.items()},
                "shards": self.shards, "tokens": self.tokens}  # fmt: skip
        gathered = D.gather(mine, self.rank, self.world)
        error = None
        if self.rank == 0:
            try:
                self.write_final(gathered, n_chunks, seconds)
            except Exception as e:
                error = f"rank 0 could not write the merged output: {e}"
                if self.world == 1:
                    raise
        error = D.broadcast(error, self.rank, self.world)
        if error:
            raise HarvestError(error)

    def write_final(self, gathered: list[dict], n_chunks: int, seconds: float) -> None:
        """Merge the ranks' statistics, write them, then the complete manifest, then remove
        the ranks' working state."""
        out, s = self.out, self.settings
        listed: dict[str, str] = {}
        shards: dict[str, dict] = {}
        for g in gathered:
            shards.update(g["shards"])
        for rel, info in sorted(shards.items()):
            listed[rel] = info["sha256"]
        if s.activations:
            expected = {store.shard_path(c) for c in range(n_chunks)}
            if set(shards) != expected:
                raise HarvestError(
                    f"shards missing after the run: {sorted(expected - set(shards))[:5]}"
                )
        site_info = {}
        if s.stats:
            for site in s.sites:
                merged = None
                for part in (g["stats"][site] for g in gathered if site in g["stats"]):
                    st = UnitStats.from_state(part, "", s.k, s.window, s.active_threshold)
                    merged = st if merged is None else merged.merge(st)
                if merged is None:  # no rank saw a token
                    raise HarvestError("no tokens were harvested")
                rel = store.stats_path(site)
                meta = {"writer": store.WRITER, "run_id": self.run_id, "site": site,
                        "window": json.dumps(list(s.window)), "k": str(s.k)}  # fmt: skip
                listed[rel] = store.save_tensors(out, rel, merged.summary(), meta, durable=True)
                site_info[site] = {"units": merged.n_units, "stats": rel}
        info = {
            **self.record,
            "run_id": self.run_id,
            "world_size": self.world,
            "status": "complete",
            "tokens": sum(g["tokens"] for g in gathered),
            "contexts_chunks": n_chunks,
            "shards": [
                {"path": rel, **{k: v for k, v in shards[rel].items() if k != "sha256"}}
                for rel in sorted(shards)
            ],
            "site_info": site_info,
            "seconds": round(seconds, 3),
        }
        store.write_manifest(out, info, listed)
        store.cleanup_ranks(out, self.run_id)
