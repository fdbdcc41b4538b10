"""Build the training task named by a :class:`TrainConfig`.

A task gives random-access training batches (``train_batch(step)`` is a pure function of
the seed and step, so a resumed run needs no replay), a fixed list of held-out batches,
the loss, and the held-out metrics of a batch.

The held-out data never depends on the training seed, so runs with different seeds are
scored on exactly the same batches:

* ``kv``: training batches come from ``KVRetrieval(seed=config.seed)``, held-out batches
  from ``KVRetrieval(seed=0)``'s "eval" split (train/eval are disjoint for every seed by
  a seed-independent hash of the sequence).
* ``bytes``: the file split is made once with ``ByteText(seed=0)`` (so the val files are
  the same for every training seed); training seed ``k`` draws window batch ``step`` as
  ``train_batch(step + k * 10_000_000)``, i.e. a disjoint range of the same random-access
  stream.
"""

from __future__ import annotations

import math

import torch

from ..data import ByteText, CorpusError, KVRetrieval, masked_accuracy, masked_loss
from .config import ConfigError, TrainConfig

__all__ = ["Task", "build_task"]

SEED_STEP_OFFSET = 10_000_000


class Task:
    """What the training loop needs from a dataset."""

    name: str
    metric: str  # headline held-out metric key
    higher_is_better: bool

    def __init__(self, batch_size: int, eval_batches: int):
        self.batch_size, self.num_eval_batches = batch_size, eval_batches
        self._eval = None

    def train_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _eval_batches(self):
        raise NotImplementedError

    def eval_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The held-out batches (built once, the same at every evaluation)."""
        if self._eval is None:
            self._eval = list(self._eval_batches())
        return self._eval

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy (fp32) over positions with ``targets != -100``."""
        return masked_loss(logits, targets)

    def score(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Held-out metrics of one batch (averaged over batches by the loop)."""
        raise NotImplementedError


class KVTask(Task):
    name, metric, higher_is_better = "kv", "eval_accuracy", True

    def __init__(self, config: TrainConfig):
        super().__init__(config.batch_size, config.eval_batches)
        m = config.model
        self.train_data = KVRetrieval(config.kv_pairs, m.seq_len, m.vocab_size, seed=config.seed)
        self.eval_data = KVRetrieval(config.kv_pairs, m.seq_len, m.vocab_size, seed=0)
        self.chance = self.train_data.chance_accuracy

    def train_batch(self, step):
        return self.train_data.batch(step, self.batch_size, "train")

    def _eval_batches(self):
        return self.eval_data.eval_batches(self.batch_size, self.num_eval_batches)

    def score(self, logits, targets):
        return {"eval_loss": float(masked_loss(logits, targets)),
                "eval_accuracy": float(masked_accuracy(logits, targets))}


class BytesTask(Task):
    name, metric, higher_is_better = "bytes", "eval_bpb", False

    def __init__(self, config: TrainConfig):
        super().__init__(config.batch_size, config.eval_batches)
        paths = list(config.data_paths) or None
        seq = config.model.seq_len
        try:
            self.train_data = ByteText(paths, seq_len=seq, split="train", seed=0)
            self.val_data = ByteText(paths, seq_len=seq, split="val", seed=0)
        except CorpusError as e:
            # One line naming the setting to fix (the CLI prints it as that flag).
            field = {"paths": "data_paths", "seq_len": "model.seq_len"}.get(e.argument, "HYPERCONN_CACHE")
            raise ConfigError(field, str(e)) from None
        self.offset = config.seed * SEED_STEP_OFFSET
        self.chance = None

    def train_batch(self, step):
        return self.train_data.train_batch(step + self.offset, self.batch_size)

    def _eval_batches(self):
        return self.val_data.eval_batches(self.batch_size, self.num_eval_batches)

    def score(self, logits, targets):
        loss = float(masked_loss(logits, targets))
        return {"eval_loss": loss, "eval_bpb": loss / math.log(2)}


def build_task(config: TrainConfig) -> Task:
    """The :class:`Task` for ``config.task`` ("kv" or "bytes")."""
    if config.task == "kv":
        return KVTask(config)
    if config.task == "bytes":
        return BytesTask(config)
    raise ValueError(f"task: expected one of ('kv', 'bytes'), got {config.task!r}")
