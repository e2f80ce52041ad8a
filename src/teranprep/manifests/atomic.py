"""Atomic file writes (temp name, fsync, rename) and file hashing."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

TMP_MARK = ".tmp-"


def temp_path_for(path: Path) -> Path:
    """A sibling temporary name unique to this process, recognisable by `is_temp_file`."""
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def is_temp_file(path: Path) -> bool:
    return path.name.startswith(".") and TMP_MARK in path.name


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_temp(tmp: Path, final: Path) -> None:
    """fsync `tmp`, rename it over `final`, fsync the directory: after this returns the file is durable."""
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    fsync_dir(final.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = temp_path_for(path)
    with open(tmp, "wb") as fh:
        fh.write(data)
    commit_temp(tmp, path)


def canonical_json(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(Path(path), canonical_json(obj))


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
