"""Sharded checkpoints of distributed runs: ``out_dir/checkpoint/`` (torch.distributed.checkpoint).

Layout of the directory::

    checkpoint/
      .metadata, __*_*.distcp   model + optimizer (DCP: every rank writes its own shards)
      meta.pt                    version, step, config, controllers, rng (rank 0's),
                                 progress, world_size, parallel  (torch.save, weights_only)

Model and optimizer state go through ``torch.distributed.checkpoint.state_dict``
(``get_state_dict`` / ``set_state_dict``): keys are parameter names whatever the wrapper
(plain, DDP or FSDP2), so a checkpoint saved by W ranks loads into W' ranks, and into a
single process, which DCP reads without a process group.

Writes are atomic: all ranks save into ``checkpoint.tmp/``; after a barrier rank 0 adds
``meta.pt`` and renames the directory into place (the previous one is moved to
``checkpoint.old/`` first and deleted last; :func:`find` falls back to it if a crash hit
between the two renames). A multi-node run needs ``out_dir`` on a filesystem every node sees.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from .checkpoint import VERSION, CheckpointError, check_compatible, restore_controllers_and_rng

__all__ = ["find", "remove", "save_sharded", "load_sharded", "load_full_into"]

META = "meta.pt"


def find(run_dir: Path) -> Optional[Path]:
    """The sharded checkpoint directory of ``run_dir`` (or its ``.old`` twin), or None."""
    for name in ("checkpoint", "checkpoint.old"):
        d = Path(run_dir) / name
        if (d / META).exists():
            return d
    return None


def remove(run_dir: Path) -> None:
    """Delete ``run_dir``'s sharded checkpoint directories (once ``checkpoint.pt`` replaced them)."""
    for name in ("checkpoint", "checkpoint.old"):
        d = Path(run_dir) / name
        if d.is_dir():
            shutil.rmtree(d)


def save_sharded(run_dir: Path, ctx, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict,
                 before_replace=None) -> None:
    """Collective: every rank calls it with the same ``meta`` (only rank 0's is written).

    ``before_replace(tmp_dir)`` (rank 0) runs once every shard and ``meta.pt`` are on disk,
    before the directory is moved into place (the training loop records checksums)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    run_dir = Path(run_dir)
    final, tmp, old = run_dir / "checkpoint", run_dir / "checkpoint.tmp", run_dir / "checkpoint.old"
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ctx.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    ctx.barrier()  # every rank's shards are on disk
    if ctx.is_main:
        torch.save({"version": VERSION, "world_size": ctx.world_size, "parallel": ctx.parallel, **meta},
                   tmp / META)
        if before_replace is not None:
            before_replace(tmp)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        (run_dir / "checkpoint.pt").unlink(missing_ok=True)  # one checkpoint per run dir
    ctx.barrier()


def _read_meta(path: Path, config_dict: dict) -> dict:
    try:
        meta = torch.load(path / META, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unreadable or truncated file
        raise CheckpointError(f"checkpoint {path} is damaged or not a hyperconn checkpoint (its {META} cannot "
                              f"be read: {type(e).__name__}); restore it from a backup, or start fresh "
                              f"without --resume") from None
    needed = ("version", "step", "config", "rng")
    missing = [k for k in needed if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a hyperconn checkpoint (missing {', '.join(missing)})")
    if meta["version"] != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {meta['version']}, "
                              f"this hyperconn reads version {VERSION}")
    check_compatible(meta["config"], config_dict, path)
    return meta


def load_sharded(path: Path, config_dict: dict, model: nn.Module, optimizer: torch.optim.Optimizer,
                 controllers: Sequence = ()) -> dict:
    """Load a sharded checkpoint into ``model`` / ``optimizer`` (plain, DDP or FSDP2, any
    world size; collective when a process group exists), with the controllers and RNG
    states. Returns ``meta``. Raises :class:`CheckpointError` for a damaged or mismatched one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    meta = _read_meta(path, config_dict)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    try:
        with warnings.catch_warnings():  # DCP warns that it loads without a process group: intended
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
    except Exception as e:  # noqa: BLE001 - DCP raises several types for missing/mismatched entries
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} does not fit this model ({type(e).__name__}: "
                              f"{first[:300]})") from None
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    # Rank 0's RNG state on every rank: the model has no dropout and batches are a pure
    # function of (seed, step), so nothing a rank draws depends on it.
    restore_controllers_and_rng(meta, path, controllers)
    return meta


def load_full_into(state: dict, names: list[str], model: nn.Module, optimizer: torch.optim.Optimizer,
                   controllers: Sequence, path: Path) -> None:
    """Load a single-process ``checkpoint.pt`` dict into a DDP / FSDP2 model and optimizer.

    ``names``: the parameter names in the optimizer's order (its integer state keys), used
    to re-key the optimizer state by name as ``set_state_dict`` expects.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    osd = state["optimizer"]
    by_name = {"state": {names[int(i)]: s for i, s in osd["state"].items()},
               "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]}
                                for g in osd["param_groups"]]}
    try:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=by_name,
                       options=StateDictOptions(full_state_dict=True))
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} does not fit this model: "
                              f"{str(e).strip().splitlines()[0][:300]}") from None
    restore_controllers_and_rng(state, path, controllers)
