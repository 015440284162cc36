"""Where documents are written: one small interface, local disk behind it.

A document is written to a temporary name beside its final path, flushed to
disk, then renamed into place, so a reader sees either the whole file or no
file. Paths are relative to the storage root and may never leave it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import uuid
from pathlib import Path, PurePosixPath
from typing import Protocol

from models.errors import StorageError, UnsafePath
from models.jobs import StoredDocument

_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def safe_file_name(name: str) -> str:
    """A file name built from user text: no separators, no leading dots."""
    cleaned = _UNSAFE_NAME_CHARS.sub("-", name).strip(".-")
    return cleaned[:200] or "document"


class Storage(Protocol):
    """What a worker needs from a document store."""

    def write(self, relative_path: str, data: bytes) -> StoredDocument: ...

    def remove(self, relative_path: str) -> None: ...

    def exists(self, relative_path: str) -> bool: ...

    def remove_tree(self, relative_path: str) -> None: ...


class LocalStorage:
    """Documents as files under one root folder."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def resolve(self, relative_path: str) -> Path:
        """The absolute path of a document, refusing any path outside the root."""
        parts = PurePosixPath(relative_path).parts
        if (
            not parts
            or PurePosixPath(relative_path).is_absolute()
            or any(part in {"..", "."} or "\\" in part for part in parts)
            or "\x00" in relative_path
        ):
            raise UnsafePath(f"document path {relative_path!r} leaves the storage root")
        target = self.root.joinpath(*parts)
        if not target.resolve().is_relative_to(self.root):
            raise UnsafePath(f"document path {relative_path!r} leaves the storage root")
        return target

    def write(self, relative_path: str, data: bytes) -> StoredDocument:
        target = self.resolve(relative_path)
        temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(temporary, "xb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, target)
            _fsync_dir(target.parent)
        except OSError as exc:
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
            raise StorageError(
                f"cannot write {relative_path}: {exc.strerror or exc}"
            ) from exc
        return StoredDocument(
            file_name=target.name,
            file_path=relative_path,
            file_size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )

    def remove(self, relative_path: str) -> None:
        try:
            self.resolve(relative_path).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(
                f"cannot remove {relative_path}: {exc.strerror}"
            ) from exc

    def exists(self, relative_path: str) -> bool:
        return self.resolve(relative_path).is_file()

    def remove_tree(self, relative_path: str) -> None:
        """Remove a folder and everything in it; a missing folder is fine."""
        folder = self.resolve(relative_path)
        try:
            shutil.rmtree(folder)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StorageError(
                f"cannot remove {relative_path}: {exc.strerror}"
            ) from exc


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
