"""Byte-level language-modelling data (vocab 256) from text files on disk (docs/design.md §3).

* Corpus: ``paths=None`` uses the Python standard library's own ``*.py`` sources
  (``sysconfig.get_paths()["stdlib"]``, recursive, skipping ``site-packages`` and
  ``dist-packages``). Otherwise ``paths`` is a file, a directory (recursive, every regular
  file) or a glob pattern (``**`` allowed), or a list of those. Empty files are skipped.
* Split by file: a file goes to "val" when ``sha1(f"{seed}:{relative_path}")`` read as a
  fraction in [0, 1) is below ``val_fraction``. With >= 2 files both splits are made
  non-empty (the smallest-hash file is moved to val if val is empty, the largest-hash file to
  train if train is empty). With exactly one file, its first ``1 - val_fraction`` of bytes
  is "train" and the rest "val".
* Storage: the split's files, each followed by ``b"\\n"``, are concatenated once into a cache
  file ``<cache_dir>/<key>.bin`` (written atomically) and memory-mapped read-only; document
  start offsets go to ``<key>.offsets.npy`` (``num_documents + 1`` int64, last = total). The
  key hashes the file list, sizes, mtimes, split, seed and val_fraction. ``cache_dir``
  defaults to ``$HYPERCONN_CACHE/bytetext`` or ``~/.cache/hyperconn/bytetext``.
* Batches: windows of ``seq_len + 1`` bytes at random offsets of the concatenated split
  (they may cross document boundaries); ``inputs = w[:, :-1]``, ``targets = w[:, 1:]``.
"""

from __future__ import annotations

import glob
import hashlib
import math
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_write_stream
from .kv_retrieval import derive_seed

_SPLITS = ("train", "val")
_SEP = b"\n"
_CACHE_VERSION = 1


class CorpusError(ValueError):
    """A corpus that cannot be used; ``argument`` names what to fix: ``"paths"`` (missing,
    empty or unmatched), ``"seq_len"`` (longer than every document) or ``"cache_dir"``
    (the byte cache cannot be written)."""

    def __init__(self, argument: str, message: str):
        super().__init__(message)
        self.argument = argument


class MissingCorpusError(CorpusError, FileNotFoundError):
    """A corpus path that does not exist (also a FileNotFoundError)."""


def bits_per_byte(loss_nats):
    """Convert a mean cross-entropy in nats per byte to bits per byte (float or tensor)."""
    return loss_nats / math.log(2)


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages"}
    files = [p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts)]
    return root, sorted(p for p in files if p.is_file())


def _expand(paths) -> list[Path]:
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    found: dict[str, Path] = {}
    for item in items:
        s = os.fspath(item)
        if any(c in s for c in "*?["):
            cands = [Path(m) for m in glob.glob(os.path.expanduser(s), recursive=True)]
            if not cands:
                raise CorpusError("paths", f"no files matched paths={s!r}: the pattern matches no file")
        else:
            p = Path(s).expanduser()
            if not p.exists():
                raise MissingCorpusError("paths", f"path does not exist: {s}")
            cands = [p]
        for c in cands:
            sub = sorted(c.rglob("*")) if c.is_dir() else [c]
            for f in sub:
                if f.is_file():
                    found.setdefault(str(f.resolve()), f.resolve())
    return sorted(found.values())


def _split_hash(seed: int, rel: str) -> float:
    return int.from_bytes(hashlib.sha1(f"{seed}:{rel}".encode()).digest(), "big") / 2.0**160


class ByteText:
    """Byte-level LM dataset over one split of a text corpus (see module docstring).

    Args:
        paths: ``None`` (stdlib ``*.py``), or file/dir/glob, or a list of them.
        seq_len: tokens per sequence ``T``; batches are ``(B, T)``.
        split: "train" or "val".
        val_fraction: share of files (or of bytes, for a single file) held out, in (0, 1).
        seed: seeds the file split and the batch windows.
        cache_dir: where the concatenated ``.bin`` / ``.offsets.npy`` cache lives.
    """

    vocab_size = 256

    def __init__(self, paths=None, seq_len: int = 256, split: str = "train",
                 val_fraction: float = 0.05, seed: int = 0, cache_dir=None):
        if split not in _SPLITS:
            raise ValueError(f"split={split!r} must be one of {_SPLITS}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} must be in the open interval (0, 1)")
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len={seq_len!r} must be a positive int")
        self.seq_len, self.split, self.val_fraction, self.seed = seq_len, split, val_fraction, seed

        if paths is None:
            root, files = _stdlib_files()
        else:
            files = _expand(paths)
            root = Path(os.path.commonpath(files)) if files else None
            if root is not None and len(files) == 1:
                root = root.parent
        stats = []
        for f in files:
            try:
                st = f.stat()
            except OSError as e:
                raise OSError(f"ByteText: cannot read file {f}: {e.strerror or e}") from e
            if st.st_size > 0:
                stats.append((f, st.st_size, st.st_mtime_ns))
        if not stats:
            what = "no file found" if not files else f"all {len(files)} matched files are empty"
            raise CorpusError("paths", f"no files matched paths={paths!r} ({what}): expected at least one "
                                       "non-empty text file")

        rel = [f.relative_to(root).as_posix() for f, _, _ in stats]
        if len(stats) == 1:
            self._byte_split = True
            chosen = stats
        else:
            self._byte_split = False
            h = [_split_hash(seed, r) for r in rel]
            is_val = [x < val_fraction for x in h]
            if not any(is_val):
                is_val[h.index(min(h))] = True
            if all(is_val):
                is_val[h.index(max(h))] = False
            chosen = [s for s, v in zip(stats, is_val) if v == (split == "val")]
        self.files: list[Path] = [f for f, _, _ in chosen]

        if cache_dir is None:
            env = os.environ.get("HYPERCONN_CACHE")
            cache_dir = Path(env) / "bytetext" if env else Path.home() / ".cache/hyperconn/bytetext"
        self.cache_dir = Path(cache_dir).expanduser()
        key = hashlib.sha256(repr((_CACHE_VERSION, split, seed, val_fraction,
                                   [(str(f), n, t) for f, n, t in chosen])).encode()).hexdigest()[:24]
        self.cache_path = self.cache_dir / f"{key}.bin"
        self._offsets_path = self.cache_dir / f"{key}.offsets.npy"
        self._build_cache(chosen)

        self.offsets = np.load(self._offsets_path)
        self._data = np.memmap(self.cache_path, dtype=np.uint8, mode="r")
        doc_lens = np.diff(self.offsets) - len(_SEP)
        if self._data.shape[0] == 0 or doc_lens.max(initial=0) <= 0:
            raise CorpusError("paths", f"split {split!r} is empty (paths={paths!r}, val_fraction={val_fraction})")
        longest = int(doc_lens.max())
        if seq_len > longest:
            raise CorpusError("seq_len", f"seq_len={seq_len} is longer than the longest document ({longest} bytes) "
                                         f"in split {split!r}: use a shorter seq_len or a larger corpus")

    def _build_cache(self, chosen) -> None:
        if self.cache_path.exists() and self._offsets_path.exists():
            try:
                offs = np.load(self._offsets_path)
                if offs[-1] == self.cache_path.stat().st_size:
                    return
            except (OSError, ValueError, IndexError):
                pass
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            probe = self.cache_dir / f".write-test-{os.getpid()}.tmp"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise CorpusError("cache_dir", f"cannot write the byte cache to {self.cache_dir} "
                                           f"({e.strerror or type(e).__name__}); set HYPERCONN_CACHE to a "
                                           "writable directory") from None
        offsets = [0]

        def write(out):
            for f, _, _ in chosen:
                try:
                    data = _read_bytes(f)
                except OSError as e:
                    raise OSError(f"ByteText: cannot read file {f}: {e.strerror or e}") from e
                if self._byte_split:
                    cut = int(len(data) * (1.0 - self.val_fraction))
                    data = data[:cut] if self.split == "train" else data[cut:]
                out.write(data)
                out.write(_SEP)
                offsets.append(offsets[-1] + len(data) + len(_SEP))

        atomic_write_stream(self.cache_path, write)
        atomic_write_stream(self._offsets_path, lambda out: np.save(out, np.asarray(offsets, np.int64)))

    @property
    def num_bytes(self) -> int:
        """Bytes in this split's concatenated stream (documents plus one separator each)."""
        return int(self._data.shape[0])

    @property
    def num_files(self) -> int:
        return len(self.files)

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    def _windows(self, g: torch.Generator, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        span = self.seq_len + 1
        starts = torch.randint(0, self.num_bytes - span + 1, (batch_size,), generator=g).numpy()
        w = torch.from_numpy(self._data[starts[:, None] + np.arange(span)].astype(np.int64))
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def train_batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows for batch ``step`` (deterministic in ``(seed, split, step)``).

        Returns ``(inputs, targets)``, int64 ``(batch_size, seq_len)`` with values in
        [0, 256) and ``targets[:, t] == inputs[:, t + 1]`` for ``t < seq_len - 1``.
        """
        g = torch.Generator()
        g.manual_seed(derive_seed(self.seed, "bytes", self.split, "train", step))
        return self._windows(g, batch_size)

    def batches(self, batch_size: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Infinite iterator; item ``k`` equals ``train_batch(start_step + k, batch_size)``."""
        step = start_step
        while True:
            yield self.train_batch(step, batch_size)
            step += 1

    train_batches = batches

    def eval_batches(self, batch_size: int, num_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``num_batches`` fixed batches ``(B, T)`` of random windows (same on every call)."""
        for i in range(num_batches):
            g = torch.Generator()
            g.manual_seed(derive_seed(self.seed, "bytes", self.split, "eval", i))
            yield self._windows(g, batch_size)

    bits_per_byte = staticmethod(bits_per_byte)

    def __repr__(self) -> str:
        return (f"ByteText(split={self.split!r}, files={self.num_files}, bytes={self.num_bytes}, "
                f"seq_len={self.seq_len})")
