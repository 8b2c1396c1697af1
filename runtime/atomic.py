"""Outputs that appear whole or not at all, and never at the cost of something wanrt did not write.

A file or folder is built under a hidden temporary name beside its target and renamed into place at the end. A
failure, Ctrl-C or SIGTERM (the CLI turns it into an interrupt) removes the temporary; what was there before stays.
A folder that already exists is replaced only when the caller asks to overwrite it and recognises it as its own by its
content; the old one is moved aside, the new one renamed in, then the old one deleted, with SIGINT and SIGTERM held
back meanwhile, so no interrupt can leave neither. A lock file beside the target keeps two writers apart.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import signal
import tempfile
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

HELD_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _writable_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the folder for {path}: {e.strerror}") from None
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write to {path.parent}: permission denied or a read-only file system")


def check_output_file(path: str | Path, suffix: str) -> Path:
    """A file path we may write: not a folder, with the suffix its content will have, in a writable folder."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a file name ending in {suffix}")
    if path.suffix.lower() != suffix:
        raise ValueError(f"{path}: the output is written as {suffix} (use a name ending in {suffix})")
    _writable_parent(path)
    return path


def check_output_dir(out: str | Path, overwrite: bool, ours: Callable[[Path], bool]) -> Path:
    """A folder path we may write: absent or empty, or (with overwrite) one that `ours` recognises."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder; refusing to replace it")
    if out.is_dir() and any(out.iterdir()):
        if not ours(out):
            raise ValueError(f"{out} is not empty and was not written by wanrt (as this command writes it); "
                             "refusing to touch it: choose another folder")
        if not overwrite:
            raise ValueError(f"{out} already exists; pass --overwrite (overwrite=True) to replace it")
    _writable_parent(out)
    return out


@contextmanager
def _lock(target: Path):
    """An exclusive lock on `.NAME.lock` beside the target, or a clear error if another writer holds it."""
    path = target.parent / f".{target.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ValueError(f"another wanrt process is writing {target}; wait for it to finish") from None
        try:  # the file may have been removed by the holder that just released it: lock the one on disk
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


@contextmanager
def signals_held():
    """SIGINT and SIGTERM wait until the block ends, then act as usual. (Python handlers, not a signal mask: another
    thread of the process could take a masked signal and interrupt the main thread all the same.)"""
    if threading.current_thread() is not threading.main_thread():  # only the main thread handles signals
        yield
        return
    pending = []
    old = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in HELD_SIGNALS}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if pending:
            signal.raise_signal(pending[0])


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False, ours: Callable[[Path], bool] = lambda p: False):
    """Yield a temporary sibling folder that becomes `out` only if the block succeeds (see the module's docstring)."""
    out = check_output_dir(out, overwrite, ours)
    with _lock(out):
        check_output_dir(out, overwrite, ours)  # again, now that no other writer can change it
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent))
        try:
            yield tmp
            with signals_held():
                old = None
                if out.exists():
                    old = out.parent / f".{out.name}.{uuid.uuid4().hex}.old"
                    out.rename(old)
                tmp.rename(out)
                if old is not None:
                    shutil.rmtree(old)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(path: str | Path, suffix: str):
    """Yield a temporary path beside `path` (a fresh name the writer creates itself, so the file gets the usual
    permissions) that is renamed to `path` only if the block succeeds."""
    path = check_output_file(path, suffix)
    tmp = path.parent / f".{path.stem}.{uuid.uuid4().hex}{suffix}.part"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
