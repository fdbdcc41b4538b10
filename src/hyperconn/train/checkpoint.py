"""``checkpoint.pt``: everything needed to continue a run exactly.

Contents (a dict saved with ``torch.save``, loadable with ``weights_only=True``)::

    version, step, config (TrainConfig.to_dict()), model, optimizer,
    controllers {name: state} (one entry per controller, see hyperconn.control),
    rng {python, numpy, torch, cuda}, progress {train_time_s, wall_time_s, tokens, ...}

Checkpoints written before controllers were generic hold a single ``controller`` entry
(the Harmonized controller's state, or None) instead of ``controllers``; they still load.

The training loop goes through :func:`save` and :func:`load` only: they pick
``checkpoint.pt`` in one process and the sharded ``checkpoint/`` directory (:mod:`.dcp`)
under torchrun, and record / check the SHA-256 of what they write / read (:mod:`.run_dir`).

Writes are atomic (temp file in the same directory, fsync, ``os.replace``), so a crash
mid-write leaves the previous checkpoint intact. Loading problems (unreadable or
truncated file, missing entries, a checkpoint from a different model or task) raise
:class:`CheckpointError` with one readable sentence.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

__all__ = ["CheckpointError", "save", "load", "find", "save_checkpoint", "load_checkpoint", "read_checkpoint",
           "rng_state", "set_rng_state", "check_compatible", "restore_controllers_and_rng"]

VERSION = 1
FILE = "checkpoint.pt"
# Settings that must match to continue a run from its checkpoint.
_MUST_MATCH = ("model", "task", "kv_pairs", "data_paths")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used to continue this run."""


def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) RNG states as weights_only-loadable values."""
    np_state = np.random.get_state()
    state = {
        "python": _tuples_to_lists(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_lists_to_tuples(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples_to_lists(x):
    return [_tuples_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _lists_to_tuples(x):
    return tuple(_lists_to_tuples(v) for v in x) if isinstance(x, (tuple, list)) else x


def save_checkpoint(path: Path, state: dict[str, Any], before_replace=None) -> None:
    """Atomically write ``state`` (plus ``version``) to ``path``.

    ``before_replace(tmp_path)``, if given, runs once the complete file is on disk and
    before it replaces ``path`` (the training loop records its checksum there)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"version": VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _diff(saved, current, prefix="") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for k in sorted(set(saved) | set(current)):
            out += _diff(saved.get(k, "<missing>"), current.get(k, "<missing>"), f"{prefix}{k}.")
        return out
    return [] if saved == current else [f"{prefix.rstrip('.')} (checkpoint {saved!r}, now {current!r})"]


def check_compatible(saved_config: dict, config_dict: dict, path: Path) -> None:
    """Raise :class:`CheckpointError` if the run-defining settings differ. Settings added
    since the checkpoint was written take their defaults (the saved config is read back
    through ``TrainConfig.from_dict``)."""
    try:
        from .config import TrainConfig
        saved_config = TrainConfig.from_dict(saved_config).to_dict()
    except (ValueError, TypeError):
        pass  # compared as saved: the differences are reported below
    diffs = []
    for key in _MUST_MATCH:
        diffs += _diff(saved_config.get(key, "<missing>"), config_dict.get(key), f"{key}.")
    if diffs:
        shown = "; ".join(diffs[:4]) + ("; ..." if len(diffs) > 4 else "")
        raise CheckpointError(f"checkpoint {path} was written by a different run configuration: {shown}. "
                              f"Use another out_dir, or drop resume to start over")


def read_checkpoint(path: Path, config_dict: dict, map_location="cpu") -> dict:
    """The checkpoint dict at ``path``, checked (format, version, run configuration) but not
    loaded into anything. Raises :class:`CheckpointError` like :func:`load_checkpoint`."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # pickle / zip / torch errors of a damaged file
        # In our words: torch's own message suggests weights_only=False, which is unsafe
        # for a file one did not write and never the fix for a damaged checkpoint.
        raise CheckpointError(f"checkpoint {path} is damaged or not a hyperconn checkpoint (it cannot be "
                              f"read as one: {type(e).__name__}); restore it from a backup, or start fresh "
                              f"without --resume") from None
    needed = ("version", "step", "config", "model", "optimizer", "rng")
    if not isinstance(state, dict) or any(k not in state for k in needed):
        missing = [k for k in needed if not isinstance(state, dict) or k not in state]
        raise CheckpointError(f"checkpoint {path} is not a hyperconn training checkpoint "
                              f"(missing {', '.join(missing)})")
    if state["version"] != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {state['version']}, "
                              f"this hyperconn reads version {VERSION}")
    check_compatible(state["config"], config_dict, path)
    return state


def load_checkpoint(path: Path, config_dict: dict, model: torch.nn.Module,
                    optimizer: Optional[torch.optim.Optimizer] = None, controllers: Sequence = (),
                    map_location="cpu") -> dict:
    """Load ``path`` into ``model`` / ``optimizer`` / ``controllers`` and restore RNG states.

    Returns the checkpoint dict (``step``, ``progress``, ...). Raises
    :class:`CheckpointError` for an unreadable, truncated or incompatible checkpoint.
    """
    path = Path(path)
    state = read_checkpoint(path, config_dict, map_location)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not fit this model: "
                              f"{str(e).strip().splitlines()[0][:300]}") from None
    if optimizer is not None:
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {path}: optimizer state does not fit this model ({e})") from None
    restore_controllers_and_rng(state, path, controllers)
    return state


def controller_states(state: dict, path: Path, controllers: Sequence) -> dict:
    """``{name: state}`` of the controllers saved in a checkpoint dict.

    Reads ``controllers`` or, from a checkpoint written before controllers were generic,
    the single ``controller`` entry, which belongs to the only controller of the model.

    Raises:
        CheckpointError: an old single entry but more than one controller to give it to.
    """
    saved = state.get("controllers")
    if saved is None and state.get("controller"):  # the format before generic controllers
        if len(controllers) > 1:
            raise CheckpointError(f"checkpoint {path} holds one controller state (an older format) but the "
                                  f"model has {len(controllers)} controllers")
        saved = {c.name: state["controller"] for c in controllers}
    return dict(saved or {})


def restore_controllers_and_rng(state: dict, path: Path, controllers: Sequence = ()) -> None:
    """Load every controller (by its ``name``) and the RNG states from a checkpoint's
    ``controllers`` (or old ``controller``) and ``rng`` entries.

    Raises:
        CheckpointError: a controller without saved state, or an unusable RNG state.
    """
    saved = controller_states(state, path, controllers)
    for controller in controllers:
        if not saved.get(controller.name):
            raise CheckpointError(f"checkpoint {path} has no state for the {controller.name!r} controller")
        controller.load_state_dict(saved[controller.name])
    try:
        set_rng_state(state["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot restore RNG state ({e})") from None


# ------------------------------------------------------------------ the training loop's entry points


def find(run_dir: Path) -> Optional[Path]:
    """The checkpoint a resume of ``run_dir`` continues from: the sharded directory when
    there is one (:func:`.dcp.find`), else ``checkpoint.pt`` when it exists, else None."""
    from . import dcp  # dcp builds on this module

    sharded = dcp.find(run_dir)
    if sharded is not None:
        return sharded
    path = Path(run_dir) / FILE
    return path if path.exists() else None


def save(run_dir: Path, ctx, model: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict) -> None:
    """Write the run's checkpoint: ``checkpoint.pt`` in one process, a sharded
    ``checkpoint/`` directory under torchrun (collective: every rank calls it with the
    same ``meta``). Either is written atomically and its SHA-256 recorded before it is
    moved into place; writing one removes the other kind.

    Args:
        run_dir: the run directory.
        ctx: the :mod:`.distributed` context (``world_size``, ``is_main``, ...).
        model, optimizer: the (possibly DDP / FSDP2 wrapped) model and its optimizer.
        meta: everything else (``step``, ``config``, ``run_id``, ``controllers``, ``rng``,
            ``progress``).
    """
    from . import dcp
    from .run_dir import current_digests, write_checksum

    run_dir = Path(run_dir)
    previous = current_digests(run_dir) if ctx.is_main else None
    before_replace = (lambda tmp: write_checksum(run_dir, tmp, previous)) if ctx.is_main else None
    if ctx.world_size > 1:
        dcp.save_sharded(run_dir, ctx, model, optimizer, meta, before_replace)
        return
    save_checkpoint(run_dir / FILE, {**meta, "model": model.state_dict(), "optimizer": optimizer.state_dict()},
                    before_replace)
    dcp.remove(run_dir)  # a run continued from a sharded checkpoint keeps one checkpoint


def load(run_dir: Path, ctx, config_dict: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         controllers: Sequence = ()) -> Optional[tuple[dict, Path]]:
    """Continue from the run's checkpoint (see :func:`find`), whichever process count wrote it.

    Checks the recorded SHA-256 before anything is unpickled, then loads the model, the
    optimizer, the controllers and the RNG states. A sharded checkpoint loads into any
    world size; a ``checkpoint.pt`` loads directly in one process and is re-keyed for
    DDP / FSDP2 under torchrun.

    Returns:
        ``(state, path)``: the checkpoint dict (``step``, ``progress``, ``run_id``, ...) and
        the file or directory it came from; None when ``run_dir`` has no checkpoint.

    Raises:
        CheckpointError: damaged (checksum, unreadable), incompatible or incomplete checkpoint.
    """
    from . import dcp
    from .optim import decay_split
    from .run_dir import verify

    path = find(run_dir)
    if path is None:
        return None
    verify(run_dir, path)  # a damaged file is refused by name before it is unpickled
    if path.is_dir():  # saved under torchrun, by any number of ranks
        return dcp.load_sharded(path, config_dict, model, optimizer, controllers), path
    if ctx.world_size == 1:
        return load_checkpoint(path, config_dict, model, optimizer, controllers, map_location=ctx.device), path
    state = read_checkpoint(path, config_dict)  # a single-process checkpoint continued under torchrun
    decay, no_decay = decay_split(ctx.local(model))
    dcp.load_full_into(state, decay + no_decay, model, optimizer, controllers, path)
    return state, path
