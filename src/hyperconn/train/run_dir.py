"""What a run directory guarantees: one writer, one run, checksummed checkpoints.

* **One writer.** :class:`RunLock` holds an exclusive OS lock (``filelock``, an ``flock``
  on POSIX) on ``<run_dir>/.lock`` for the run's lifetime; the kernel releases it when the
  process dies, so a lock left by a killed process never blocks. A second writer fails at
  once with one line naming the directory and the holder (``.lock.json``: pid, host, time).
* **One run.** ``run.json`` holds the run's id and history. A fresh start (no
  ``resume``) first removes the previous run's checkpoint, summary and diagnostics
  (:func:`start_fresh`), so nothing of it can be resumed or reported as this run's; a
  resume (:func:`check_resume`) refuses a checkpoint written by another run (another id)
  and any change of a setting that alters the trajectory, naming old and new values,
  unless ``allow_config_change`` is set (then the change is recorded in ``run.json``).
* **Checksums.** :func:`write_checksum` records the SHA-256 of every checkpoint file
  (``checkpoint.pt`` and every file of a sharded ``checkpoint/``) and :func:`verify`
  checks them before anything is loaded.
* **No leftovers.** Partial ``*.tmp`` files of writes interrupted by a kill are removed at
  the next start (:func:`remove_partial_writes`), under the lock.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import shutil
import socket
import uuid
import warnings
from pathlib import Path
from typing import Optional

from .config import ConfigError
from .metrics import read_json, write_json

__all__ = ["prepare_out_dir", "RunLock", "start_fresh", "check_resume", "record_resume", "run_id", "write_checksum", "verify",
           "remove_partial_writes", "TRAJECTORY_FREE", "RUN_FILE", "CHECKSUMS"]

RUN_FILE = "run.json"
CHECKSUMS = "checkpoint.sha256.json"
LOCK = ".lock"
LOCK_INFO = ".lock.json"
# Settings a resume may change freely: they do not alter what the run computes.
# ``parallel``: DDP and FSDP2 compute the same step, and sharded checkpoints resume with
# any world size and wrapper by design (docs/distributed.md).
TRAJECTORY_FREE = ("out_dir", "quiet", "resume", "stop_after", "threads", "ckpt_every", "log_every",
                   "parallel", "tensorboard", "allow_config_change")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def prepare_out_dir(out_dir, field: str = "out_dir") -> Path:
    """Create ``out_dir`` and check that it can be written.

    Raises:
        ConfigError: naming ``field`` if it is an existing file, cannot be created, or is
            not writable (a read-only filesystem or directory).
    """
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(field, f"{path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(field, f"cannot write to {path} ({e.strerror or type(e).__name__})") from None
    return path


class RunLock:
    """Exclusive lock on a run directory for the lifetime of a ``with`` block.

    Raises:
        ConfigError: (field ``out_dir``) if another process holds it, naming the holder.
    """

    def __init__(self, run_dir: Path, field: str = "out_dir"):
        self.run_dir, self.field = Path(run_dir), field
        self._lock = None

    def __enter__(self) -> "RunLock":
        from filelock import FileLock, Timeout

        self._lock = FileLock(str(self.run_dir / LOCK), timeout=0)
        try:
            self._lock.acquire()
        except Timeout:
            holder = read_json(self.run_dir / LOCK_INFO) or {}
            who = (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"
                   if holder else "another process")
            raise ConfigError(self.field, f"{self.run_dir} is in use by {who}; wait for it to finish, "
                                          f"or use another directory") from None
        write_json(self.run_dir / LOCK_INFO, {"pid": os.getpid(), "host": socket.gethostname(), "since": _now()})
        return self

    def __exit__(self, *exc) -> None:
        (self.run_dir / LOCK_INFO).unlink(missing_ok=True)
        self._lock.release()


def remove_partial_writes(run_dir: Path) -> list[str]:
    """Delete ``*.tmp`` files and ``checkpoint.tmp/`` left by a kill mid-write; their names."""
    run_dir = Path(run_dir)
    removed = []
    for p in sorted(run_dir.glob("*.tmp")):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p.name)
    return removed


def run_id(run_dir: Path) -> Optional[str]:
    """The id of the run that owns ``run_dir`` (None for a directory without ``run.json``)."""
    info = read_json(Path(run_dir) / RUN_FILE)
    return info.get("run_id") if isinstance(info, dict) else None


def start_fresh(run_dir: Path) -> str:
    """Make the previous run's results unreachable, then claim the directory; the new id.

    Order matters for a kill at any point: the checkpoint goes first (so nothing of the
    old run can be resumed), then its checksums, summary and diagnostics, and only then
    is the new ``run.json`` written.
    """
    run_dir = Path(run_dir)
    (run_dir / "checkpoint.pt").unlink(missing_ok=True)
    for name in ("checkpoint", "checkpoint.old"):
        d = run_dir / name
        if d.exists():
            stale = run_dir / f"{name}.stale.tmp"  # removed now, or by the next start
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(d, stale)
            shutil.rmtree(stale, ignore_errors=True)
    for name in (CHECKSUMS, "summary.json"):
        (run_dir / name).unlink(missing_ok=True)
    for name in ("diagnostics", "tensorboard"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    new_id = uuid.uuid4().hex
    write_json(run_dir / RUN_FILE, {"run_id": new_id, "started": _now(), "history": []})
    return new_id


def _changes(saved: dict, now: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k, "<missing>"), now.get(k, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changes(a, b, f"{prefix}{k}.")
        elif a != b and f"{prefix}{k}" not in TRAJECTORY_FREE:
            out.append((f"{prefix}{k}", a, b))
    return out


def check_resume(run_dir: Path, state: dict, config_dict: dict, path: Path) -> list:
    """Refuse to resume ``state`` (a checkpoint's dict) into this run; the allowed changes.

    Raises:
        CheckpointError: the checkpoint belongs to another run (its ``run_id`` differs
            from ``run.json``'s), or a trajectory setting changed without
            ``allow_config_change``; the message names old and new values.
    """
    from .checkpoint import CheckpointError

    owner = run_id(run_dir)
    ckpt_owner = state.get("run_id")
    if owner is not None and ckpt_owner is not None and owner != ckpt_owner:
        raise CheckpointError(f"checkpoint {path} belongs to another run (id {ckpt_owner}, this directory's "
                              f"run is {owner}); start fresh without --resume, or resume from its own directory")
    saved = state.get("config") or {}
    try:  # settings added since the checkpoint was written take their defaults
        from .config import TrainConfig
        saved = TrainConfig.from_dict(saved).to_dict()
    except ValueError:
        pass
    changes = _changes(saved, config_dict)
    if changes and not config_dict.get("allow_config_change"):
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes[:4]) + ("; ..." if len(changes) > 4 else "")
        raise CheckpointError(f"resume would change the run's trajectory ({shown}); resume with the settings "
                              f"it was started with, start fresh without --resume, or pass "
                              f"--allow-config-change to continue anyway (recorded in {RUN_FILE})")
    return changes


def record_resume(run_dir: Path, step: int, changes: list) -> None:
    """Append a resume (and any allowed setting changes) to ``run.json``'s history."""
    path = Path(run_dir) / RUN_FILE
    info = read_json(path) or {"run_id": None, "started": None, "history": []}
    info.setdefault("history", []).append({"resumed_at_step": step, "time": _now(),
                                           "changed": {k: [a, b] for k, a, b in changes}})
    write_json(path, info)


# ---------------------------------------------------------------------- checksums
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_checksum(run_dir: Path, target: Path, previous: Optional[dict] = None) -> None:
    """Record the SHA-256 of ``target`` (a file, or every file under a directory).

    Called *before* ``target`` is moved into place, with ``previous`` the digests of the
    checkpoint it replaces: both are kept, so a kill between this write and the move
    leaves a checksum file that still vouches for the checkpoint on disk.
    """
    target = Path(target)
    files = sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else [target]
    digests = {str(p.relative_to(target)) if target.is_dir() else "": _sha256(p) for p in files}
    write_json(Path(run_dir) / CHECKSUMS, {"current": digests, "previous": previous or {}})


def current_digests(run_dir: Path) -> dict:
    info = read_json(Path(run_dir) / CHECKSUMS)
    return info.get("current", {}) if isinstance(info, dict) else {}


def verify(run_dir: Path, target: Path) -> None:
    """Check ``target`` (the checkpoint file or sharded directory) against its checksums.

    A checkpoint with no checksum record at all (written by hyperconn before records
    existed) is loaded unverified, with a warning.

    Raises:
        CheckpointError: a file's digest matches neither the current nor the previous
            record; names the damaged file and what to do.
    """
    from .checkpoint import CheckpointError

    target = Path(target)
    info = read_json(Path(run_dir) / CHECKSUMS)
    if not isinstance(info, dict):
        warnings.warn(f"checkpoint {target} has no checksum record (written by an earlier hyperconn): "
                      "loading it unverified", RuntimeWarning, stacklevel=2)
        return
    files = sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else [target]
    paths = {str(p.relative_to(target)) if target.is_dir() else "": p for p in files}
    digests = {key: _sha256(p) for key, p in paths.items()}  # each file read once
    records = [info.get("current") or {}, info.get("previous") or {}]
    if any(record and record == digests for record in records):
        return
    bad = next((paths[k] for k, d in digests.items() if all(r.get(k) != d for r in records)),
               files[0] if files else target)
    raise CheckpointError(f"checkpoint file {bad} is damaged (its SHA-256 does not match the one recorded when "
                          "it was written); it cannot be resumed: restore it from a backup, or start fresh "
                          "without --resume")

