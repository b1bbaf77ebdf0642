"""Atomic writes: a failed or cancelled job never leaves a half-written file or folder.

Everything is written under a temporary name in the same directory, then renamed into
place (`os.replace` is atomic on POSIX within one filesystem).

Temporary names are the project's own, so that leftovers of a killed process can be found
and removed without touching anything else:

    .<name>.mosaic-<pid>-<random>.tmp     a file or folder being written by process <pid>
    .<name>.mosaic-old-<pid>              the previous folder, moved aside during a swap

`clean_stale` removes such entries when they are older than `STALE_SECONDS` *and* their
process is gone, so a live writer (of this process or another) is never disturbed.

A folder write never destroys what it did not create: `replace_folder` refuses an existing
folder that holds anything its `owns` rule does not claim (`check_output_folder` says so
before any work starts).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

log = logging.getLogger(__name__)

STALE_SECONDS = 600.0  # a temporary entry this old whose process is gone is a crash leftover
_TEMP_NAME = re.compile(r"^\..+\.mosaic-(\d+)-[A-Za-z0-9_]+\.tmp$")
_OLD_NAME = re.compile(r"^\..+\.mosaic-old-(\d+)$")
# Names written before temporary names carried the pid (mkstemp's 8 random characters).
_LEGACY_NAME = re.compile(r"^\..+\.(?:[A-Za-z0-9_]{8}\.tmp|old\.\d+)$")

Owns = Callable[[Path], bool]  # does this write own the existing entry at this path?


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.mosaic-{os.getpid()}-"


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale(folder: str | Path, older_than: float = STALE_SECONDS, legacy: bool = False) -> list[Path]:
    """Remove this project's temporary leftovers in `folder` (not recursive); returns what was removed.

    Only names of the project's own pattern, older than `older_than` seconds, whose writing
    process is no longer running. `legacy=True` (for folders the project owns, like the
    cache) also removes the pid-less names of earlier versions by age alone.
    """
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = _TEMP_NAME.match(entry.name) or _OLD_NAME.match(entry.name)
        if match is not None:
            pid = int(match.group(1))
            if pid == os.getpid() or _process_alive(pid):
                continue
        elif not (legacy and _LEGACY_NAME.match(entry.name)):
            continue
        try:
            age = now - entry.lstat().st_mtime
        except OSError:
            continue
        if age < older_than:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        removed.append(entry)
        log.warning("removed a leftover temporary entry of a killed write: %s", entry)
    return removed


def _check_parent(path: Path, what: str) -> None:
    """The nearest existing ancestor of `path` must be a writable folder."""
    for ancestor in path.parents:
        if ancestor.exists() or ancestor.is_symlink():
            if not ancestor.is_dir():
                raise ValueError(f"{what} '{path}': '{ancestor}' is a file, not a folder: choose another path")
            if not os.access(ancestor, os.W_OK | os.X_OK):
                raise ValueError(f"{what} '{path}': cannot write in '{ancestor}': choose a writable folder")
            # Permission bits do not tell everything (root passes os.access everywhere, yet
            # /proc, /sys and read-only mounts refuse): try a file, before any work starts.
            try:
                with tempfile.TemporaryFile(dir=ancestor, prefix=".mosaic-probe-"):
                    pass
            except OSError as error:
                reason = error.strerror or type(error).__name__
                raise ValueError(f"{what} '{path}': cannot write in '{ancestor}' ({reason}): choose a writable folder") from None
            return


def check_output_file(path: Any, what: str = "output file", suffix: Optional[str] = None) -> Path:
    """A path a file may be written to (not empty, not a folder, parent writable), or ValueError."""
    if not isinstance(path, (str, Path)) or not str(path).strip():
        raise ValueError(f"{what} must be a file path, got {path!r}")
    path = Path(path).expanduser()
    if suffix is not None and path.suffix != suffix:
        raise ValueError(f"{what} must name a {suffix} file, got '{path}'")
    if path.is_dir():
        raise ValueError(f"{what} '{path}' is a folder: give a file name (like {path / ('out' + (suffix or ''))})")
    _check_parent(path, what)
    return path


def is_temporary_name(name: str) -> bool:
    """Whether `name` is one of this project's temporary names (a write under way, or a killed one's leftover)."""
    return bool(_TEMP_NAME.match(name) or _OLD_NAME.match(name))


def check_output_folder(
    path: Any, owns: Optional[Owns] = None, what: str = "output folder", allowed: str = "a new or empty folder"
) -> Path:
    """A folder `replace_folder(path, owns)` may write, or ValueError — checked before any work starts.

    Refused: an empty path, a file, an unwritable parent, and an existing folder holding any
    entry that `owns` does not claim (None claims nothing: only an empty folder is replaced).
    `allowed` is what the refusals tell the user to give instead.
    """
    if not isinstance(path, (str, Path)) or not str(path).strip():
        raise ValueError(f"{what} must be a folder path, got {path!r}")
    path = Path(path).expanduser()
    if path.is_symlink():
        raise ValueError(f"{what} '{path}' is a symbolic link: give the folder itself, or a new or empty folder")
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} '{path}' exists and is not a folder: choose {allowed}")
    _check_parent(path, what)
    if path.is_dir():
        foreign = sorted(entry.name for entry in path.iterdir() if not (owns is not None and owns(entry)))
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise ValueError(
                f"{what} '{path}' already holds files this command did not write ({shown}): "
                f"choose {allowed}, nothing was changed"
            )
    return path


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the result is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, value: Any) -> None:
    """Write `value` as indented JSON to `path` atomically."""
    write_bytes(path, (json.dumps(value, indent=2) + "\n").encode())


@contextlib.contextmanager
def replace_folder(path: str | Path, owns: Optional[Owns] = None) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces `path` whole, on error it is removed.

    `path` must be absent, empty, or hold only entries that `owns` claims (a checkpoint of
    the same format, say); anything else raises ValueError before a byte is written, so a
    write never deletes what it did not create. Readers see either the old folder or the new
    one, never a mix (the old one is moved aside, the new one renamed in, the old one deleted).
    Stale temporary folders of killed writes beside `path` are removed first.
    """
    path = check_output_folder(path, owns)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path.parent)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp"))
    os.chmod(tmp, 0o755)  # mkdtemp creates 0700
    try:
        yield tmp
        check_output_folder(path, owns)  # again: something may have appeared while we worked
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.mosaic-old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes, read 1 MiB at a time: the one file digest of checkpoints and caches."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
