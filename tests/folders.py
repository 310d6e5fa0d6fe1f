"""What a folder holds, for the tests that resid changes no file it did not write and
leaves no temporary file behind."""

from __future__ import annotations

import hashlib
from pathlib import Path


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> SHA-256), symlinks not followed."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def hidden_leftovers(parent: Path) -> list[str]:
    """The names in ``parent`` that start with a dot: a writer's temporary siblings."""
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]
