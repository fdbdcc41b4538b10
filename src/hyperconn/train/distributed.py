"""Data parallelism under ``torchrun``: PyTorch's DDP (default) or FSDP2 (``fully_shard``).

The training loop talks to a small context object instead of ``torch.distributed``:

* :class:`Single` (one process, ``WORLD_SIZE`` unset or 1): every reduction is the
  identity and ``torch.distributed`` is never imported, so the single-process path costs
  nothing and behaves exactly as before.
* :class:`Distributed` (``WORLD_SIZE > 1``, i.e. launched by ``torchrun``): initialises the
  process group from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``, ``MASTER_PORT``), gloo on CPU and NCCL on CUDA, wraps the model and
  reduces the few scalars the loop needs so that every rank takes the same decisions.

Data split: ``batch_size`` is the *global* batch. Every rank builds the same
deterministic global batch ``train_batch(step)`` of shape ``(B, T)`` and keeps rows
``[rank·B/W, (rank+1)·B/W)`` (:meth:`Single.rows`), so W ranks together see exactly the
batch one process would, and the averaged gradients are the single-process gradients.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .._device import resolve_device  # noqa: F401 - re-exported: the device of a run
from .config import ConfigError

__all__ = ["Single", "Distributed", "setup", "env_world_size", "resolve_device"]


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (torchrun sets it), 1 when unset."""
    raw = os.environ.get("WORLD_SIZE", "").strip()
    try:
        return int(raw) if raw else 1
    except ValueError:
        raise ConfigError("WORLD_SIZE", f"expected an integer in the environment, got {raw!r}") from None


class Single:
    """One process: no process group; reductions return their input."""

    rank, world_size, local_rank = 0, 1, 0
    is_main = True
    parallel: Optional[str] = None

    def __init__(self, device: torch.device):
        self.device = device

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch ``(B, ...)`` → ``(B/W, ...)``."""
        return x

    def mean(self, values: Sequence[float]) -> list[float]:
        """Mean over ranks of each value (one collective for the whole list)."""
        return [float(v) for v in values]

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def local(self, model: nn.Module) -> nn.Module:
        """The module whose parameters the optimizer steps (DDP: the wrapped module)."""
        return model

    def hook_model(self, model: nn.Module, make_replica: Callable[[], nn.Module]) -> nn.Module:
        """The model that evaluation hooks get: a plain module with full parameters.

        One process: ``model``. DDP: the wrapped module (calling it runs no gradient
        all-reduce). FSDP: hooks may call layer methods outside ``forward`` (where FSDP
        parameters are shards), so they get a plain replica built by ``make_replica``
        and filled with the gathered full state (collective; a full copy per rank).
        """
        return model

    def grad_norm(self, params) -> float:
        """Global L2 norm of all gradients (fp32)."""
        norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


class Distributed(Single):
    """One rank of a torchrun job; see the module docstring.

    Args:
        device: ``cpu`` or ``cuda`` (the CUDA index is taken from ``LOCAL_RANK``).
        parallel: ``"ddp"`` (replicated model, all-reduced gradients) or ``"fsdp"``
            (parameters, gradients and optimizer state sharded with ``fully_shard``).
        batch_size: the global batch; must be a multiple of the world size.
    """

    def __init__(self, device: torch.device, parallel: str, batch_size: int):
        world = env_world_size()
        if batch_size % world:  # checked before any process group exists
            raise ConfigError("batch_size", f"the global batch must be a multiple of the world size "
                                            f"{world}, got {batch_size}")
        import torch.distributed as dist

        self.dist = dist
        self.parallel = parallel
        self.owns_group = not dist.is_initialized()  # a caller's own group is left alone
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":  # one GPU per process: torchrun's LOCAL_RANK picks it
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        super().__init__(device)
        if self.owns_group:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0

    def rows(self, x):
        per = x.shape[0] // self.world_size
        return x[self.rank * per:(self.rank + 1) * per]

    def mean(self, values):
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        self.dist.all_reduce(t)  # SUM: gloo and NCCL both have it for float64
        return (t / self.world_size).tolist()

    def wrap(self, model):
        if self.parallel == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(self.device.type, (self.world_size,))
            # One FSDP group per block (all-gathered just before it runs), then the root
            # (embedding, tied head, final norm).
            for block in getattr(model, "blocks", []):
                fully_shard(block, mesh=mesh)
            return fully_shard(model, mesh=mesh)
        from torch.nn.parallel import DistributedDataParallel as DDP

        # No buffer broadcast: the model's buffers are RoPE tables (a function of the
        # config) and the Harmonized scale, which every rank computes from the same
        # all-reduced gain. Broadcasting would hide a rank that drifts.
        # forward_sync_buffers (torch >= 2.13) replaces broadcast_buffers.
        import inspect

        no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in \
            inspect.signature(DDP.__init__).parameters else {"broadcast_buffers": False}
        # Single-pass connections with reduce="learned": the last layer's predicted read
        # (its b_pre) then feeds nothing, so that parameter has no gradient and DDP must be told.
        unused = any(getattr(m, "single_pass", False) for m in model.modules())
        return DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                   find_unused_parameters=unused, **no_sync)

    def local(self, model):
        return model.module if self.parallel == "ddp" else model

    def hook_model(self, model, make_replica):
        if self.parallel == "ddp":
            return model.module
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        if getattr(self, "_replica", None) is None:
            self._replica = make_replica()
        self._replica.load_state_dict(full)
        return self._replica.train(model.training)

    def grad_norm(self, params):
        if self.parallel != "fsdp":  # DDP gradients are already averaged and replicated
            return super().grad_norm(params)
        # FSDP gradients are DTensor shards: sum the squares of the local shards over ranks.
        local = [p.grad.to_local().detach().double().pow(2).sum() for p in params if p.grad is not None]
        t = torch.stack(local).sum().reshape(1) if local else torch.zeros(1, dtype=torch.float64,
                                                                           device=self.device)
        self.dist.all_reduce(t)
        return float(t.sqrt())

    def barrier(self):
        if self.device.type == "cuda":
            self.dist.barrier(device_ids=[self.device.index])
        else:
            self.dist.barrier()

    def close(self):
        if self.owns_group and self.dist.is_initialized():
            self.dist.destroy_process_group()


def setup(device: torch.device, parallel: str, batch_size: int) -> Single:
    """The context for this process: :class:`Distributed` under torchrun (``WORLD_SIZE > 1``),
    else :class:`Single`."""
    if env_world_size() > 1:
        return Distributed(device, parallel, batch_size)
    return Single(device)
