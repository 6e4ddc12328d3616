"""Writing tintc's outputs into a directory, safely against crashes, races and planted files.

One call of `write_files` replaces a set of files in the output directory as one step:

- a lock (`.<dir>.tintc-lock` beside the directory, flock) makes concurrent writers wait
  (up to LOCK_WAIT seconds, then fail with an OutputError);
- the new directory is built in a fresh private sibling (`tempfile.mkdtemp`): the new files
  (created with O_EXCL | O_NOFOLLOW, so never through a planted link), hard links to every
  other entry of the old directory, and the manifest; then it is swapped in with one rename
  exchange (two renames where the kernel lacks it), so a reader sees the old set or the new
  one, never a mix, and a killed write leaves the old set (its leftovers are removed by the
  next write);
- the manifest (`.tintc-outputs.json`) records each file tintc wrote, its sha256 and the
  config it came from (`source`): a file tintc did not write, or that was changed since, is
  never overwritten (OutputError naming it, unless force=True), and tintc files from another
  config that the new set does not rewrite are dropped (no stale report beside a new package).

`check_output` says before any work whether a later write would be refused (links in the path
resolved whole, so that every write goes to the same real folder). `write_tree` takes a function
that builds any set of files (save_pretrained) in a private staging folder, under the lock, and
makes them the folder's content; with `exclusive` (write_tree always) the folder must be new or
hold only what tintc wrote there.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from ir.errors import OutputError

MANIFEST = ".tintc-outputs.json"
LOCK_WAIT = 60.0  # seconds a writer waits for another one on the same directory

Content = str | bytes | Callable[[Path], None]


def check_output(directory, names, force: bool = False, exclusive: bool = False) -> Path:
    """Before any work is done: `directory` with its links resolved whole (every later write goes to
    that one real place; a path without links is returned as given), refused now when write_files
    would refuse to write `names` there."""
    directory = Path(directory)
    if os.path.realpath(directory) != os.path.normpath(os.path.abspath(directory)):
        directory = directory.resolve()
    if directory.exists() and not directory.is_dir():
        raise OutputError(f"{directory}: exists and is not a directory; allowed: a directory or a new path")
    if exclusive:
        _only_ours(directory, _manifest(directory))
    foreign = [name for name in names if _foreign(directory, name, _manifest(directory))]
    if foreign and not force:
        raise OutputError(f"{directory}: would overwrite {', '.join(foreign)}, which tintc did not write (or "
                          "which changed since); allowed: move them away, or another output folder")
    return directory


def write_files(directory, files: dict[str, Content], force: bool = False, source: str | None = None,
                exclusive: bool = False) -> list[Path]:
    """Write `files` (text, bytes, or a function that writes the path it is given) into `directory`
    as one set; return their final paths. `source` names the config they come from. `exclusive`:
    the directory must be new or hold only what tintc wrote there (by its manifest), no link."""
    directory = Path(directory)
    with _locked_output(directory):
        return _write_locked(directory, files, force, source, exclusive)


def write_tree(directory, build: Callable[[Path], None], source: str | None = None,
               last: str | None = None) -> list[Path]:
    """`build(folder)` writes any files into a fresh private folder beside `directory`; they become
    the new content of `directory` as one set (exclusive: a new directory or one tintc wrote). The
    lock is held throughout; a build that is killed leaves a staging leftover that the next write
    removes. `last`: the file written last (as a marker that the set is complete)."""
    directory = Path(directory)
    with _locked_output(directory):
        _only_ours(directory, _manifest(directory))  # refused before the build, not after it
        work = Path(tempfile.mkdtemp(prefix=f".{directory.name}.new-", dir=directory.parent))
        try:
            build(work)
            names = sorted(os.listdir(work), key=lambda name: (name == last, name))
            nested = [name for name in names if os.path.islink(work / name) or not (work / name).is_file()]
            if nested:
                raise OutputError(f"{directory}: the build wrote {', '.join(nested)}, not plain files; allowed: "
                                  "plain files only")
            files = {name: (lambda path, src=work / name: os.replace(src, path)) for name in names}
            return _write_locked(directory, files, False, source, exclusive=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)


@contextmanager
def _locked_output(directory: Path):
    """The parent made, the directory checked, its lock held and the leftovers of killed writes gone."""
    parent = directory.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{directory}: cannot create its parent directory ({err.strerror or err}); "
                          "allowed: an output path under a writable directory") from None
    if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
        raise OutputError(f"{directory}: exists and is not a directory; allowed: a directory or a new path")
    with _locked(parent / f".{directory.name}.tintc-lock", directory):
        _remove_leftovers(parent, directory.name)
        yield


def _write_locked(directory: Path, files: dict[str, Content], force: bool, source: str | None,
                  exclusive: bool) -> list[Path]:
    parent = directory.parent
    old = _manifest(directory)
    if exclusive:
        _only_ours(directory, old)
    foreign = [name for name in files if _foreign(directory, name, old)]
    if foreign and not force:
        raise OutputError(f"{directory}: would overwrite {', '.join(foreign)}, which tintc did not write (or "
                          "which changed since); allowed: move them away, or pass --force")
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.new-", dir=parent))
    try:
        manifest = _fill(staging, directory, files, old, source)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.chmod(staging, 0o755)
        _swap(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # the old directory after a swap, else the half-built one
    return [directory / name for name in files]


def _fill(staging: Path, directory: Path, files: dict[str, Content], old: dict, source: str | None) -> dict:
    """The new files and the old directory's other entries in `staging`; returns the new manifest."""
    manifest = {}
    for name, content in files.items():
        if Path(name).name != name or name in (MANIFEST, "", ".", ".."):
            raise OutputError(f"{name!r}: not a plain file name; allowed: a name without directories")
        path = staging / name
        if name.endswith(".json") and isinstance(content, str):
            _strict_json(name, content)
        if callable(content):
            content(path)  # in a fresh private directory: nothing can be planted there
        else:
            _write_new(path, content.encode("utf-8") if isinstance(content, str) else content)
        os.chmod(path, 0o644)
        manifest[name] = {"sha256": _sha256(path), "source": source}
    if not directory.is_dir():
        return manifest
    for entry in os.scandir(directory):
        name = entry.name
        if name in files or name == MANIFEST:
            continue
        stale = name in old and source is not None and old[name].get("source") != source
        if stale and not _foreign(directory, name, old):
            continue  # tintc's output from another config: stale beside the new set
        target = staging / name
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), target)
        elif entry.is_dir():
            shutil.copytree(entry.path, target, symlinks=True, copy_function=os.link)
        else:
            os.link(entry.path, target, follow_symlinks=False)
        if name in old:
            manifest[name] = old[name]
    return manifest


def _refuse_constant(constant: str):
    raise ValueError(f"{constant} is not a JSON number")


def _strict_json(name: str, text: str) -> None:
    """A .json output must be strict JSON: NaN and Infinity (which json.dumps writes) are not."""
    try:
        json.loads(text, parse_constant=_refuse_constant)
    except ValueError as err:
        raise OutputError(f"{name}: would hold non-strict JSON ({err}); allowed: finite numbers only") from None


def _write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if path.is_symlink() or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}


def _only_ours(directory: Path, manifest: dict) -> None:
    """Refuse a directory holding any entry tintc's manifest does not record as it wrote it."""
    if not directory.is_dir():
        return
    others = sorted(entry.name for entry in os.scandir(directory)
                    if entry.name != MANIFEST and _foreign(directory, entry.name, manifest))
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise OutputError(f"{directory}: holds {shown}, which tintc did not write there (or a link, or changed "
                          "since); allowed: a new directory, or one this command wrote before")


def _foreign(directory: Path, name: str, manifest: dict) -> bool:
    """Whether `name` exists in `directory` and is not (or no longer) what tintc wrote there."""
    path = directory / name
    if not os.path.lexists(path):
        return False
    if name not in manifest or path.is_symlink() or not path.is_file():
        return True
    return _sha256(path) != manifest[name].get("sha256")


@contextmanager
def _locked(lock: Path, directory: Path):
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as err:
        raise OutputError(f"{lock}: cannot open the output lock ({err.strerror or err}); allowed: a regular file "
                          "tintc may create beside the output directory") from None
    try:
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise OutputError(f"{directory}: another tintc has been writing it for {LOCK_WAIT:.0f} s "
                                      "(lock held); allowed: one writer at a time") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


def _remove_leftovers(parent: Path, name: str) -> None:
    """Staging directories of writes that were killed (the lock is held, so none is in use)."""
    for path in parent.glob(f".{name}.new-*"):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


def _swap(staging: Path, directory: Path) -> None:
    """Put `staging` at `directory`; the old directory ends up at `staging`."""
    if not os.path.lexists(directory):
        os.rename(staging, directory)
        return
    if _exchange(staging, directory):
        return
    aside = staging.with_name(staging.name + ".old")  # no atomic exchange here: a moment with no directory
    os.rename(directory, aside)
    os.rename(staging, directory)
    os.rename(aside, staging)


def _exchange(a: Path, b: Path) -> bool:
    """renameat2(RENAME_EXCHANGE) on Linux; False where it is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    if ctypes.get_errno() in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(b))
