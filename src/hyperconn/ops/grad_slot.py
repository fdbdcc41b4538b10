"""One ∂x buffer for the stream ops of one layer call, on either backend.

A layer reads its streams x (..., n, C) in up to three ops (the coefficient projection,
``H_pre x``, the merge), so autograd would get three ∂x tensors and add them in two more
passes over the streams. Instead the ops of one layer call share a
:class:`StreamGradSlot`: the merge, whose backward runs first, leaves its ∂x in the slot
and returns none; the op that finishes the layer's ∂x (the projection, or a fused
coefficient op) adds its own part in the same store and returns the sum.

Autograd runs them in that order whenever they are all in the graph: the merge consumes
the branch output built from ``H_pre x``, and both consume coefficients built from the
projection. Only plain backward passes defer; with ``create_graph=True`` (grad mode on
inside backward) every op returns its own ∂x. A buffer is picked up only by the backward
pass (graph task) that left it, so one left by an earlier partial backward
(``retain_graph=True`` with the coefficients never reached) is never added twice.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["StreamGradSlot", "deferring", "pending", "take", "defer"]


class StreamGradSlot:
    """Lets the stream ops of one layer call write ∂x into a single buffer (module doc).

    CPU path (:mod:`.cpu`): pass the same slot to ``merge_streams``, ``stream_pre`` and
    ``rms_projection``; the projection returns the sum. HyperConnection uses a slot only
    when its coefficients are dynamic, so the projection is always part of the graph.

    Triton path (:mod:`.triton_backend`): a fused coefficient op that reads ``H_pre x``
    *arms* the slot in its forward (``armed``: the streams it read), and the merge defers
    its ∂x only into a slot armed for its own x, so a layer whose coefficients took
    another path gets every ∂x returned.
    """

    __slots__ = ("grad", "task", "armed")

    def __init__(self):
        self.grad = None
        self.task = None  # the backward pass (graph task) that left ``grad``
        self.armed = None  # Triton: the streams tensor whose fused op will take the merge's ∂x


# The id of the running backward pass (None on a torch without it: then nothing defers).
_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)


def deferring(slot: Optional[StreamGradSlot]) -> bool:
    """Whether an op's backward may leave or take ∂x through ``slot`` now: a slot, a plain
    backward pass (grad mode off) and a torch that names its graph tasks."""
    return slot is not None and _graph_task_id is not None and not torch.is_grad_enabled()


def pending(slot: Optional[StreamGradSlot]) -> Optional[torch.Tensor]:
    """The ∂x buffer the merge left in this backward pass (still in the slot), or None."""
    if deferring(slot) and slot.grad is not None and slot.task == _graph_task_id():
        return slot.grad
    return None


def take(slot: Optional[StreamGradSlot]) -> Optional[torch.Tensor]:
    """:func:`pending`, taken out of the slot (for the op that returns the sum)."""
    grad = pending(slot)
    if grad is not None:
        slot.grad = None
    return grad


def defer(slot: StreamGradSlot, grad: torch.Tensor) -> None:
    """Leave ``grad`` in ``slot`` for this backward pass (the caller returns no ∂x). A
    second merge of the same coefficients (``finish`` called twice) adds to the first's."""
    held = pending(slot)
    if held is not None:
        held.add_(grad)
        return
    task = _graph_task_id()
    slot.grad, slot.task = grad, task
    # Dropped when this backward pass ends, taken or not: a partial backward that never
    # reaches the op returning the sum (autograd.grad to the branch alone) must not keep a
    # stream-sized buffer per layer alive for as long as the graph lives.
    torch.autograd.Variable._execution_engine.queue_callback(lambda: _drop(slot, task))


def _drop(slot: StreamGradSlot, task) -> None:
    if slot.task == task:
        slot.grad = None
