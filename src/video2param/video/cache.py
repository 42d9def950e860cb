"""On-disk cache of per-video features (safetensors), keyed by content, sampling and encoder.

An entry's key is the SHA-256 of: the video file's *content* hash, the sampling settings (JSON) and the
encoder's :attr:`~video2param.video.encoder.VisionEncoder.identity`. A changed file, setting or encoder
therefore misses. Each entry is one ``.safetensors`` file whose metadata records the key and a checksum of
the tensor bytes; an entry that cannot be read, belongs to another key or fails its checksum is deleted and
recomputed, never trusted. Writes go to a temporary file first and are renamed into place, so a crash never
leaves a half-written entry under a valid name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..atomic_files import remove_stale_temporaries, write_atomically
from .digest import tensor_digest

__all__ = ["FeatureCache", "CACHE_FORMAT", "CACHE_VERSION"]

logger = logging.getLogger(__name__)

CACHE_FORMAT = "video2param.feature_cache"
#: Bumped when the sampling rule or entry layout changes, so old entries miss instead of lying.
CACHE_VERSION = "1"

_HASH_BLOCK = 1 << 20
_SCALAR_TYPES = (bool, int, float, str, type(None))

Entry = dict[str, Any]  # tensors and JSON scalars (bool, int, float, str, None)


def _canonical(value: Any) -> Any:
    """Settings → JSON-stable values (tuples become lists, floats stay exact, paths become strings)."""
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, _SCALAR_TYPES):
        return value
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    raise ValueError(f"sampling setting of type {type(value).__name__} cannot be part of a cache key")


class FeatureCache:
    """A directory of cached feature entries.

    Use :meth:`get_or_compute` (or :meth:`VisionEncoder.encode_video(..., cache=...)
    <video2param.video.encoder.VisionEncoder.encode_video>`). Counters ``hits``, ``misses`` and
    ``corrupt`` say what happened since the cache object was created.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"feature cache directory {self.directory} exists and is not a directory")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0
        self.corrupt = 0
        # (path, size, mtime_ns, ctime_ns, inode) → content hash: re-hash only when the file changes.
        self._hash_memo: dict[tuple, str] = {}

    # -- keys ------------------------------------------------------------------------------------------

    def file_hash(self, path: str | os.PathLike) -> str:
        """SHA-256 of a file's bytes (memoised while its size and times do not change)."""
        path = Path(path)
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such file") from None
        memo_key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
        cached = self._hash_memo.get(memo_key)
        if cached is not None:
            return cached
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(_HASH_BLOCK):
                digest.update(block)
        value = digest.hexdigest()
        self._hash_memo[memo_key] = value
        return value

    def key(self, path: str | os.PathLike, settings: Mapping[str, Any], encoder: Any) -> str:
        """Cache key of ``path`` (by content) sampled with ``settings`` and encoded by ``encoder``.

        ``encoder`` is a :class:`VisionEncoder` (its ``identity`` is used) or an identity string.
        """
        identity = encoder if isinstance(encoder, str) else getattr(encoder, "identity", None)
        if not isinstance(identity, str) or not identity:
            raise ValueError("encoder must be a VisionEncoder (with .identity) or a non-empty identity string")
        description = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "content": self.file_hash(path),
            "settings": _canonical(dict(settings)),
            "encoder": identity,
        }
        return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()

    def entry_path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    # -- entries ---------------------------------------------------------------------------------------

    def get(self, key: str) -> Entry | None:
        """The entry for ``key``, or None when absent or damaged (counted in ``corrupt``).

        Nothing is deleted here: the file may be another process's entry, renamed into place after this read
        began; a damaged entry is replaced by the next :meth:`put` of the same key instead.
        """
        path = self.entry_path(key)
        if not path.is_file():
            return None
        try:
            return self._read(path, key)
        except FileNotFoundError:  # removed since the check (clear() elsewhere): a plain miss
            return None
        except Exception as exc:  # any failure to read or verify means: do not trust it
            self.corrupt += 1
            logger.warning("feature cache entry %s is corrupt (%s); recomputing it", path, exc)
            return None

    def _read(self, path: Path, key: str) -> Entry:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        if metadata.get("format") != CACHE_FORMAT or metadata.get("version") != CACHE_VERSION:
            raise ValueError("not an entry of this cache format/version")
        if metadata.get("key") != key:
            raise ValueError("entry belongs to another key")
        if metadata.get("checksum") != tensor_digest(sorted(tensors.items())):
            raise ValueError("checksum mismatch")
        scalars = json.loads(metadata["scalars"])
        if not isinstance(scalars, dict) or set(scalars) & set(tensors):
            raise ValueError("malformed scalar metadata")
        return {**tensors, **scalars}

    def put(self, key: str, entry: Mapping[str, Any], *, description: Mapping[str, Any] | None = None) -> Path:
        """Write ``entry`` (tensors + JSON scalars) under ``key`` atomically; returns the file path."""
        tensors: dict[str, torch.Tensor] = {}
        scalars: dict[str, Any] = {}
        for name, value in entry.items():
            if not isinstance(name, str):
                raise ValueError(f"cache entry names must be strings, got {name!r}")
            if isinstance(value, torch.Tensor):
                # A private CPU copy: safetensors refuses shared storage and inference tensors are read-only.
                tensors[name] = value.detach().to("cpu").clone().contiguous()
            elif isinstance(value, _SCALAR_TYPES):
                scalars[name] = value
            else:
                raise ValueError(f"cache entry {name!r} must be a tensor or a JSON scalar, got {type(value).__name__}")
        metadata = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "key": key,
            "checksum": tensor_digest(sorted(tensors.items())),
            "scalars": json.dumps(scalars),
            "description": json.dumps(_canonical(dict(description or {}))),
        }
        path = self.entry_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Temporary file + os.replace (normal file permissions, so a shared cache stays readable by all its users).
        write_atomically(path, lambda temporary: save_file(tensors, os.fspath(temporary), metadata=metadata))
        # Temporaries of killed writers of this entry; an hour old at least, as a live writer may own a young one.
        remove_stale_temporaries(path.parent, [path.name], locked=False)
        return path

    def get_or_compute(
        self,
        path: str | os.PathLike,
        settings: Mapping[str, Any],
        encoder: Any,
        compute_fn: Callable[[], Mapping[str, Any]],
    ) -> Entry:
        """Cached entry for (``path`` content, ``settings``, ``encoder``), else ``compute_fn()`` stored and returned.

        ``compute_fn`` returns a mapping of names to tensors and JSON scalars. Cached tensors come back on CPU.
        """
        key = self.key(path, settings, encoder)
        entry = self.get(key)
        if entry is not None:
            self.hits += 1
            return entry
        self.misses += 1
        computed = dict(compute_fn())
        identity = encoder if isinstance(encoder, str) else encoder.identity
        self.put(key, computed, description={"source": os.fspath(path), "settings": dict(settings), "encoder": identity})
        return computed

    def clear(self) -> int:
        """Delete every entry; returns how many were removed."""
        removed = 0
        for entry in self.directory.glob("*/*.safetensors"):
            if entry.name.startswith("."):
                continue  # a temporary file of a writer
            try:
                entry.unlink()
            except FileNotFoundError:  # another process cleared it first
                continue
            removed += 1
        return removed

    def __repr__(self) -> str:
        return f"FeatureCache({os.fspath(self.directory)!r}, hits={self.hits}, misses={self.misses}, corrupt={self.corrupt})"
