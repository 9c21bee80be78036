"""Crash-safe checkpoint directories: a reader sees the old complete checkpoint or the new complete
one, never a partial one.

**Writing** (:func:`atomic_directory`), for a checkpoint at ``<parent>/<name>``:

1. every file is written into a fresh sibling ``<parent>/.<name>.ecospa-tmp.<host>.<pid>.<rand>``,
   flushed and ``fsync``-ed, then the temporary directory itself is ``fsync``-ed;
2. swap: when ``<name>`` holds a previous checkpoint it is renamed to
   ``.<name>.ecospa-old.<host>.<pid>.<rand>``, the temporary directory is renamed to ``<name>``,
   the parent directory is ``fsync``-ed, and the old one deleted. (When ``<name>`` does not exist
   or is an empty directory, one rename does it.)

A ``save`` is complete when it returns. Killed at any moment before, it leaves either the
previous checkpoint at ``<name>`` or, killed between the two renames, the previous checkpoint at
``.<name>.ecospa-old.*`` (the new one is then discarded as incomplete: the save did not return).

**Recovery**, at the start of every save into ``<name>``: when ``<name>`` is missing, the newest
``.ecospa-old`` left by a dead writer is renamed back; temporary and old directories left by
writers that are no longer running (same host, process id gone) are deleted. Directories of
writers on other hosts, or still running, are left alone.

**Reading** (:func:`open_snapshot`): the directory is opened first and every file is opened
relative to it (``dir_fd``), so a save swapping directories meanwhile cannot mix files of two
checkpoints; when ``<name>`` is missing, a complete ``.ecospa-old`` sibling is read instead;
a file vanishing under the reader (a concurrent save deleted the old directory) makes it start
over. Files are opened without following symlinks and must be regular files.

A non-empty directory without ``ecospa.json`` is never replaced (it is not a checkpoint).
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import socket
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

from ecospa.errors import CheckpointError

__all__ = ["MANIFEST", "Writer", "atomic_directory", "check_writable", "Snapshot", "open_snapshot", "recover",
           "exists"]

MANIFEST = "ecospa.json"
_TMP, _OLD = "ecospa-tmp", "ecospa-old"


def _host() -> str:
    return socket.gethostname().replace(os.sep, "_") or "host"


def _sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}.{_host()}.{os.getpid()}.{secrets.token_hex(4)}"


def _leftovers(target: Path, kind: str) -> list[tuple[Path, str, int]]:
    """``(path, host, pid)`` of every ``kind`` sibling of ``target``."""
    prefix = f".{target.name}.{kind}."
    out = []
    try:
        names = os.listdir(target.parent)
    except FileNotFoundError:
        return out
    for n in names:
        if not n.startswith(prefix):
            continue
        parts = n[len(prefix):].rsplit(".", 2)
        if len(parts) == 3 and parts[1].isdigit():
            out.append((target.parent / n, parts[0], int(parts[1])))
    return out


def _dead(host: str, pid: int) -> bool:
    """True when the writer ``(host, pid)`` is known not to be running (this host only)."""
    if host != _host() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` durable (best effort where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def recover(target: Path) -> None:
    """Repair what a writer killed mid-save left next to ``target`` (see the module docstring)."""
    target = Path(os.path.realpath(target))
    olds = [(p, h, pid) for p, h, pid in _leftovers(target, _OLD) if _dead(h, pid)]
    if not os.path.lexists(target):
        done = [p for p, _, _ in olds if (p / MANIFEST).is_file()]
        if done:
            newest = max(done, key=lambda p: (p / MANIFEST).stat().st_mtime_ns)
            os.rename(newest, target)
            fsync_dir(target.parent)
            olds = [o for o in olds if o[0] != newest]
    for p, h, pid in olds + [t for t in _leftovers(target, _TMP) if _dead(t[1], t[2])]:
        shutil.rmtree(p, ignore_errors=True)


@dataclass
class Writer:
    """Writes the files of one checkpoint into its temporary directory; each file is fsync-ed."""

    root: Path
    sizes: dict[str, int] = field(default_factory=dict)

    def write(self, name: str, content: bytes | Callable[[BinaryIO], object]) -> int:
        """Write file ``name`` (bytes, or a function writing into the open file); return its size."""
        with open(self.root / name, "xb") as f:
            if isinstance(content, (bytes, bytearray)):
                f.write(content)
            else:
                content(f)
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        self.sizes[name] = size
        return size


def _check_target(target: Path) -> bool:
    """Whether ``target`` exists (as a checkpoint or an empty directory); refuse anything else."""
    if not os.path.lexists(target):
        return False
    if not target.is_dir():
        raise CheckpointError(f"cannot save to {target}: it exists and is not a directory; choose "
                              "a directory path")
    if not (target / MANIFEST).is_file() and any(target.iterdir()):
        raise CheckpointError(f"refusing to replace {target}: it is a non-empty directory without "
                              f"{MANIFEST}, so not an ecospa checkpoint; save into a new or empty "
                              "directory")
    return True


def _nearest(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists."""
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _unwritable(given: str | os.PathLike, target: Path, e: OSError) -> CheckpointError:
    """The CheckpointError for a checkpoint folder that cannot be created: names the user's path
    (not the temporary sibling the OS refused), the folder at fault and the way out."""
    where = os.fspath(given)
    shown = where if os.fspath(target) == os.path.abspath(where) else f"{where} ({target})"
    base = _nearest(target.parent)
    if base.is_dir():
        why = f"cannot create a folder in {base} ({e.strerror or type(e).__name__})"
    else:
        why = f"{base} is a file, not a folder"
    return CheckpointError(f"cannot save to {shown}: {why}; choose a folder you can write to (a new or "
                           "empty folder, or an existing checkpoint)")


def check_writable(directory: str | os.PathLike) -> Path:
    """Check, before any expensive work, that ``ecospa.save(model, directory)`` can write there:
    ``directory`` is new, an empty folder or a checkpoint, and a folder can be created next to it
    (probed by creating and removing one in its nearest existing ancestor: nothing is left
    behind). Return the resolved path.

    Raises:
        CheckpointError: naming ``directory`` and why it cannot be written.
    """
    target = Path(os.path.realpath(directory))
    base = _nearest(target.parent)
    try:
        _check_target(target)
        if not base.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(base))
        probe = _sibling(base / target.name, _TMP)
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise _unwritable(directory, target, e) from None
    return target


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Writer]:
    """Write a checkpoint directory atomically: ``with atomic_directory(d) as w: w.write(...)``.

    The files appear at ``d`` all at once when the block exits normally; if it raises, ``d`` is
    unchanged and the temporary directory is removed.

    Raises:
        CheckpointError: ``d`` is a file, or a non-empty directory that is not a checkpoint, or it
            (or its temporary sibling) cannot be created there.
    """
    given = target
    target = Path(os.path.realpath(target))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        recover(target)
        _check_target(target)
        tmp = _sibling(target, _TMP)
        tmp.mkdir()
    except OSError as e:
        raise _unwritable(given, target, e) from None
    try:
        yield Writer(tmp)
        fsync_dir(tmp)
        _swap(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap(tmp: Path, target: Path) -> None:
    if _check_target(target) and (target / MANIFEST).is_file():
        old = _sibling(target, _OLD)
        os.rename(target, old)
        os.rename(tmp, target)
        fsync_dir(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:  # missing or an empty directory: rename replaces it atomically
        os.rename(tmp, target)
        fsync_dir(target.parent)


@dataclass
class Snapshot:
    """The open files of one complete checkpoint: ``files[name]`` binary file objects."""

    path: Path
    manifest: bytes
    files: dict[str, BinaryIO]

    def close(self) -> None:
        """Close every file."""
        for f in self.files.values():
            f.close()

    def __enter__(self) -> "Snapshot":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


def _open_in(dfd: int | None, root: Path, name: str) -> BinaryIO:
    try:
        if dfd is not None:
            fd = os.open(name, _FLAGS, dir_fd=dfd)
        else:  # pragma: no cover - platforms without dir_fd
            fd = os.open(root / name, _FLAGS)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise CheckpointError(f"{root / name} is a symbolic link; a checkpoint holds only the regular "
                              "files ecospa.save writes: copy the file in place of the link") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise CheckpointError(f"{root / name} is not a regular file; a checkpoint holds only the "
                              "files ecospa.save writes")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _candidates(target: Path) -> list[Path]:
    if (target / MANIFEST).is_file():
        return [target]
    if os.path.lexists(target) and not target.is_dir():
        raise CheckpointError(f"{target} is not a directory; ecospa.load reads the directory that "
                              "ecospa.save wrote")
    olds = [p for p, _, _ in _leftovers(target, _OLD) if (p / MANIFEST).is_file()]
    if not olds and (target / MANIFEST).is_file():  # a save finished its swap meanwhile
        return [target]
    if not olds:
        what = "does not exist" if not os.path.lexists(target) else f"has no {MANIFEST}"
        raise CheckpointError(f"no checkpoint at {target}: the directory {what}; give the directory "
                              "ecospa.save(model, directory) wrote")
    return sorted(olds, key=lambda p: (p / MANIFEST).stat().st_mtime_ns, reverse=True)


def exists(directory: str | os.PathLike) -> bool:
    """Whether a complete checkpoint can be read at ``directory`` (including the previous one of
    a save killed between its two renames). Use it to decide whether to resume."""
    try:
        _candidates(Path(os.path.realpath(directory)))
    except CheckpointError:
        return False
    return True


def open_snapshot(directory: str | os.PathLike,
                  files_of: Callable[[bytes, Path], Iterable[str]], attempts: int = 8) -> Snapshot:
    """Open the manifest and every file it lists, all from the same checkpoint directory.

    Args:
        directory: the checkpoint directory.
        files_of: ``(manifest bytes, directory) -> file names`` (it validates the manifest).

    Raises:
        CheckpointError: no checkpoint there, a listed file missing, a file that is not regular.
    """
    target = Path(os.path.realpath(directory))
    last: Exception | None = None
    for attempt in range(attempts):
        for path in _candidates(target):
            dfd: int | None = None
            opened: dict[str, BinaryIO] = {}
            try:
                if os.open in os.supports_dir_fd:
                    dfd = os.open(path, os.O_RDONLY)
                with _open_in(dfd, path, MANIFEST) as f:
                    manifest = f.read()
                for name in files_of(manifest, path):
                    opened[name] = _open_in(dfd, path, name)
                return Snapshot(path, manifest, opened)
            except FileNotFoundError as e:  # swapped or deleted under us: look again
                last = e
                for f in opened.values():
                    f.close()
            except BaseException:
                for f in opened.values():
                    f.close()
                raise
            finally:
                if dfd is not None:
                    os.close(dfd)
        time.sleep(0.02 * (attempt + 1))
    raise CheckpointError(f"{target}: a file listed in {MANIFEST} is missing ({last}); the checkpoint "
                          "is incomplete (copied partially?): save it again")
