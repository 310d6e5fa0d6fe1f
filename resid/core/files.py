"""Folders written whole, and deleted only when resid can prove it wrote them.

Everything resid writes to disk as a folder (a checkpoint from ``resid.save``, the pages
of ``resid attention``) goes through :func:`replace_folder`:

1. the files are written into a fresh hidden sibling, ``.NAME.partial-XXXX``;
2. a manifest, ``resid-manifest.json``, records who wrote them and every file's
   relative path and SHA-256;
3. the sibling is swapped in with one rename (Linux's ``renameat2(RENAME_EXCHANGE)``
   where it exists, so the path never stands empty; elsewhere two renames with SIGINT
   and SIGTERM held back until both are done);
4. the previous folder, now at the hidden path, is removed file by file, and only the
   files its manifest lists with matching hashes are removed.

A folder that already exists is replaced only when it is empty or when every file in it
is listed in a manifest of the same writer with a matching hash; otherwise
:class:`ForeignFilesError` names the files resid did not write. SIGINT and SIGTERM
during the write remove the partial folder and leave the previous one in place.

Single files (a harvest's shards and statistics, its manifest) go through
:func:`atomic_write`: a temporary sibling named ``.NAME.resid-tmp-XXXXXXXX`` (recognisable
as resid's by :func:`is_temp`, so a kill at any instant leaves only names resid knows),
fsynced, then renamed over ``NAME``.

Every path read from a manifest is checked by :func:`inside` (relative, no ``..``, inside
the folder once symlinks are resolved) right before it is read or deleted, and only regular
files are read (:func:`read_regular`), so a manifest cannot point resid at a file elsewhere,
at a device such as ``/dev/zero``, or through a symlink. Files get the permissions the
user's umask gives (``0o666 & ~umask``), as ``open`` would, not ``mkstemp``'s ``0o600``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MANIFEST = "resid-manifest.json"
MANIFEST_MAX_BYTES = 16 << 20  # a manifest larger than this is not one resid wrote
TEMP_MARK = ".resid-tmp-"  # in the name of every temporary file atomic_write makes
_TEMP = re.compile(r"\.(?P<name>.+)\.resid-tmp-[A-Za-z0-9_]{6,}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_MAX_REL = 1024  # characters in a manifest path
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100
_UMASK_LOCK = threading.Lock()


class ForeignFilesError(FileExistsError):
    """An existing output path holds files resid cannot prove it wrote; they are named."""


class UnsafePathError(ValueError):
    """A path read from a file (a manifest) that is absolute, climbs out with ``..``, leaves
    its folder through a symlink, or is not a regular file; the message names it."""


def umask() -> int:
    """The process's umask (read without changing it where Linux allows).

    >>> oct(0o666 & ~umask())   # the mode open() gives a new file, e.g. '0o644'
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The permissions a new file gets under the user's umask (``0o666 & ~umask``)."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    """The permissions a new folder gets under the user's umask (``0o777 & ~umask``)."""
    return 0o777 & ~umask()


def check_relpath(rel: object, what: str = "a manifest path") -> str:
    """``rel`` if it is a plain relative POSIX path (no ``..``, ``.``, empty part, backslash,
    NUL, or leading ``/``), else :class:`UnsafePathError`.

    >>> check_relpath("shards/000001.safetensors")
    'shards/000001.safetensors'
    """
    if not isinstance(rel, str) or not rel:
        raise UnsafePathError(f"{what} must be a non-empty string, not {rel!r}")
    if len(rel) > _MAX_REL or "\0" in rel or "\\" in rel or rel.startswith("/"):
        raise UnsafePathError(f"{what} {rel[:80]!r} is not a relative path inside its folder")
    if any(part in ("", ".", "..") for part in rel.split("/")) or (
        len(rel) > 1 and rel[1] == ":"  # a Windows drive
    ):
        raise UnsafePathError(f"{what} {rel[:80]!r} is not a relative path inside its folder")
    return rel


def inside(folder: str | Path, rel: object, what: str = "a manifest path") -> Path:
    """``folder / rel``, checked now: ``rel`` is relative without ``..`` and no component
    below ``folder`` is a symlink, so the path cannot leave ``folder``.

    >>> inside("h", "stats/blocks.0.hook_resid_post.safetensors")
    PosixPath('h/stats/blocks.0.hook_resid_post.safetensors')
    """
    rel = check_relpath(rel, what)
    folder = Path(folder)
    here = folder
    for part in rel.split("/"):
        here = here / part
        try:
            if stat.S_ISLNK(os.lstat(here).st_mode):
                raise UnsafePathError(f"{what} {rel!r} passes through the symlink {here}")
        except FileNotFoundError:
            break
    real, root = os.path.realpath(folder / rel), os.path.realpath(folder)
    if os.path.commonpath([real, root]) != root or real == root:
        raise UnsafePathError(f"{what} {rel!r} resolves outside {folder}")
    return folder / rel


def open_regular(path: str | Path) -> tuple[int, os.stat_result]:
    """An fd (the caller closes it) on ``path`` if it is a regular file, with its stat: a
    symlink is not followed, and a FIFO or device is refused without waiting on it
    (:class:`UnsafePathError`)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafePathError(f"{path} is a symlink, not a regular file") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnsafePathError(f"{path} is not a regular file")
    return fd, st


def read_regular(path: str | Path, max_bytes: int) -> bytes:
    """The bytes of the regular file ``path`` (not through a symlink), refusing one larger
    than ``max_bytes``: a bounded read whatever ``path`` turns out to be.

    >>> read_regular("h/resid-manifest.json", 16 << 20)[:1]
    b'{'
    """
    fd, st = open_regular(path)
    try:
        if st.st_size > max_bytes:
            raise UnsafePathError(
                f"{path} is {st.st_size:,} bytes, more than the {max_bytes:,} resid reads here"
            )
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(min(max_bytes, st.st_size) + 1)
    finally:
        os.close(fd)
    if len(data) > min(max_bytes, st.st_size):
        raise UnsafePathError(f"{path} grew while being read: it is not a finished file")
    return data


def sha256(path: str | Path) -> str:
    """SHA-256 (hex) of the regular file ``path``; a symlink, FIFO or device is refused
    (:class:`UnsafePathError`) rather than followed or read forever."""
    digest = hashlib.sha256()
    fd, st = open_regular(path)
    with os.fdopen(fd, "rb") as f:
        left = st.st_size
        while left > 0:
            block = f.read(min(1 << 20, left))
            if not block:
                break
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def is_temp(name: str) -> str | None:
    """The file name an :func:`atomic_write` temporary stands for (None: not one)."""
    m = _TEMP.fullmatch(name)
    return m.group("name") if m else None


def atomic_write(path: str | Path, data: bytes, durable: bool = True) -> str:
    """Write ``data`` to ``path`` whole or not at all; returns its SHA-256 (hex).

    The bytes go to a new sibling ``.NAME.resid-tmp-XXXXXXXX`` (made exclusively, so it
    is resid's), which gets the umask's permissions, is fsynced when ``durable``, and is
    renamed over ``path``. A failure removes the sibling; a kill leaves at most that
    sibling, which :func:`is_temp` recognises.

    >>> atomic_write("h/stats/x.safetensors", safetensors.torch.save(tensors))
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARK}", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        _fsync(path.parent)
    return hashlib.sha256(data).hexdigest()


def target(out: str | Path) -> Path:
    """The absolute path a write to ``out`` lands on: a symlink is followed (the link
    itself is kept and goes on pointing at the new folder)."""
    out = Path(out).expanduser()
    if out.is_symlink():
        out = Path(os.path.realpath(out))
    return Path(os.path.abspath(out))


def read_manifest(folder: Path) -> dict | None:
    """``folder``'s ``resid-manifest.json`` if it is one resid could have written (a
    regular file under 16 MiB, JSON, its ``files`` mapping safe relative paths to SHA-256
    digests), else None."""
    try:
        manifest = json.loads(read_regular(Path(folder) / MANIFEST, MANIFEST_MAX_BYTES))
    except (OSError, ValueError, RecursionError):  # UnsafePathError is a ValueError
        return None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(v, str) and _HEX64.fullmatch(v) for v in files.values()
    ):
        return None
    try:
        for rel in files:
            check_relpath(rel)
    except UnsafePathError:
        return None
    return manifest


def write_manifest(folder: Path, writer: str) -> None:
    """List every regular file under ``folder`` (relative path -> SHA-256) as ``writer``'s."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            if rel != MANIFEST and stat.S_ISREG(os.lstat(path).st_mode):
                files[rel] = sha256(path)
    put_manifest(folder, writer, files, durable=False)  # a staging folder: swapped in later


def put_manifest(
    folder: Path, writer: str, listed: dict[str, str], durable: bool = True, **fields: object
) -> None:
    """Write ``folder``'s manifest whole (:func:`atomic_write`): ``writer``, the files it
    lists (relative path -> SHA-256, sorted) and the writer's own ``fields``; the one
    format :func:`read_manifest` reads.

    >>> put_manifest(out, "resid harvest", {"stats/x.safetensors": digest}, harvest=record)
    """
    body = {"writer": writer, "files": dict(sorted(listed.items())), **fields}
    atomic_write(folder / MANIFEST, (json.dumps(body, indent=1) + "\n").encode(), durable)


def entries(folder: Path) -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, lstat) of everything under ``folder``, symlinks not followed.

    >>> sorted(rel for rel, st in entries(Path("h")))[:1]
    ['ranks']
    """
    stack = [folder]
    while stack:
        here = stack.pop()
        with os.scandir(here) as it:
            for entry in it:
                st = entry.stat(follow_symlinks=False)
                rel = Path(entry.path).relative_to(folder).as_posix()
                yield rel, st
                if stat.S_ISDIR(st.st_mode):
                    stack.append(Path(entry.path))


def foreign_files(folder: Path, writer: str) -> list[str]:
    """What in ``folder`` resid cannot prove ``writer`` wrote (empty: the folder may go)."""
    found = list(entries(folder))
    if not found:
        return []
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("writer") != writer:
        why = "no resid manifest" if manifest is None else f"written by {manifest.get('writer')!r}"
        return [f"{rel} ({why})" if rel == MANIFEST else rel for rel, _ in found]
    listed = manifest["files"]  # checked by read_manifest: relative, no ".."
    dirs = {p for rel in listed for p in Path(rel).parents if str(p) != "."}
    foreign = []
    for rel, st in found:
        if rel == MANIFEST:
            continue
        if stat.S_ISDIR(st.st_mode):
            if Path(rel) not in dirs:
                foreign.append(rel + "/")
        elif not stat.S_ISREG(st.st_mode) or rel not in listed:
            foreign.append(rel)
        elif sha256(folder / rel) != listed[rel]:
            foreign.append(f"{rel} (changed since resid wrote it)")
    return foreign


def describe(names: list[str], limit: int = 8) -> str:
    """The first ``limit`` names, comma-separated, and how many more there are."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_replaceable(out: Path, writer: str, flag: str = "the output path") -> None:
    """Raise unless writing ``out`` would delete nothing resid cannot prove it wrote."""
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise ForeignFilesError(
            f"{out} exists and is not a folder: choose another {flag}, or remove it first"
        )
    here = Path.cwd().resolve()
    real = out.resolve()
    if real == here or real in here.parents:
        raise ForeignFilesError(
            f"{out} is the current directory (or holds it): resid replaces its output folder "
            f"whole, which would pull the directory out from under your shell; give a new "
            f"subfolder as {flag}, e.g. {out / 'resid-out'}"
        )
    foreign = foreign_files(out, writer)
    if foreign:
        raise ForeignFilesError(
            f"{out} holds files that {writer} did not write: {describe(foreign)}. resid only "
            f"replaces a folder it wrote itself (listed in its {MANIFEST}); move those files, "
            f"or choose another {flag}"
        )


def remove_owned(folder: Path, writer: str) -> list[str]:
    """Delete the files ``folder``'s manifest lists with matching hashes, the manifest and
    the folders left empty; return what was left (and warn about it)."""
    manifest = read_manifest(folder)
    if manifest is not None and manifest.get("writer") == writer:
        for rel, digest in manifest["files"].items():
            try:  # checked again right before the delete: inside, regular, ours
                path = inside(folder, rel)
                if stat.S_ISREG(os.lstat(path).st_mode) and sha256(path) == digest:
                    path.unlink()
            except (OSError, ValueError):
                pass
        (folder / MANIFEST).unlink(missing_ok=True)
    for root, dirs, _ in os.walk(folder, topdown=False):
        for d in dirs:
            try:
                (Path(root) / d).rmdir()
            except OSError:
                pass
    try:
        folder.rmdir()
        return []
    except OSError:
        left = [rel for rel, _ in entries(folder)] if folder.is_dir() else []
        warnings.warn(
            f"left {folder} in place: it holds files resid did not write ({describe(left)})",
            stacklevel=3,
        )
        return left


@contextmanager
def signals_raise() -> Iterator[None]:
    """While inside, SIGTERM raises ``SystemExit`` (and SIGINT ``KeyboardInterrupt``), so
    ``finally`` blocks run; a signal ignored by the caller stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    saved = {}
    for sig, handler in ((signal.SIGTERM, on_term), (signal.SIGINT, signal.default_int_handler)):
        if signal.getsignal(sig) == signal.SIG_DFL:
            saved[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, previous in saved.items():
            signal.signal(sig, previous)


@contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM are held back while inside and acted on the way out.

    Python runs signal handlers in the main thread, whichever thread the kernel delivered
    the signal to, so deferring in the handler (not with a thread's signal mask, which
    another thread would escape) holds them for the whole process."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def defer(signum, frame):
        pending.append(signum)

    saved = {sig: signal.signal(sig, defer) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        for signum in dict.fromkeys(pending):
            handler = saved[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where that is not available."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError, TypeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_in(tmp: Path, out: Path) -> Path | None:
    """Put ``tmp`` at ``out``; return where the previous ``out`` now is (or None)."""
    if not os.path.lexists(out):
        os.rename(tmp, out)
        return None
    if _exchange(tmp, out):
        return tmp
    old = out.with_name(f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    return old


def _umask_modes(folder: Path) -> None:
    """Give every file and folder under ``folder`` the umask's permissions (libraries that
    write through ``mkstemp`` leave ``0o600``, unreadable to the user's group)."""
    fmode, dmode = file_mode(), dir_mode()
    for root, dirs, names in os.walk(folder):
        for d in dirs:
            if not os.path.islink(os.path.join(root, d)):
                os.chmod(os.path.join(root, d), dmode)
        for name in names:
            p = os.path.join(root, name)
            if stat.S_ISREG(os.lstat(p).st_mode):
                os.chmod(p, fmode | (os.lstat(p).st_mode & 0o111 & ~umask()))


def make_staging(out: Path) -> Path:
    """A fresh hidden sibling of ``out`` (``.NAME.partial-XXXX``) with the umask's mode."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        tmp.chmod(dir_mode())  # mkdtemp's 0o700 would hide the files from other users
        return tmp
    except OSError as e:
        raise OSError(f"cannot write to {out}: {e.strerror or e}") from e


def check_target(out: str | Path, writer: str, flag: str = "the output path") -> Path:
    """Raise now, before any work, if ``replace_folder(out, writer)`` would refuse or fail."""
    path = target(out)
    check_replaceable(path, writer, flag)
    make_staging(path).rmdir()
    return path


@contextmanager
def replace_folder(
    out: str | Path, writer: str, flag: str = "the output path", durable: bool = False
) -> Iterator[Path]:
    """Yield an empty hidden folder beside ``out``; on success it becomes ``out`` (with a
    manifest naming ``writer``), on any failure or signal it is removed and ``out`` is left
    as it was. ``durable`` fsyncs the files before the swap (for checkpoints)."""
    out = target(out)
    check_replaceable(out, writer, flag)
    tmp = make_staging(out)
    swapped = False
    old: Path | None = None
    with signals_raise():
        try:
            yield tmp
            _umask_modes(tmp)
            write_manifest(tmp, writer)
            if durable:
                for root, _, names in os.walk(tmp):
                    for name in names:
                        _fsync(Path(root) / name)
                _fsync(tmp)
            check_replaceable(out, writer, flag)  # again: something may have arrived since
            with signals_held():
                old = _swap_in(tmp, out)
                swapped = True
            if durable:
                _fsync(out.parent)
        finally:
            if not swapped:
                shutil.rmtree(tmp, ignore_errors=True)  # made by mkdtemp above: all ours
            if old is not None:
                remove_owned(old, writer)
