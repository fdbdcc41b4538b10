"""Training: config, loop, optimizer/schedule, checkpoints, metrics (see docs/training.md).

    >>> from hyperconn.train import TrainConfig, train
    >>> from hyperconn.models import GPTConfig, ConnectionConfig
    >>> cfg = TrainConfig(model=GPTConfig(n_layer=2, n_embd=32, seq_len=32,
    ...                                   connection=ConnectionConfig("mhc", streams=4)),
    ...                   kv_pairs=4, steps=20, out_dir="runs/demo", quiet=True)
    >>> summary = train(cfg)          # doctest: +SKIP

or step by step with the :class:`Trainer` that ``train`` runs::

    >>> with Trainer(cfg) as trainer:  # doctest: +SKIP
    ...     trainer.resume()
    ...     loss = trainer.train_step(0)
    ...     metrics = trainer.evaluate(1)
"""

from .checkpoint import CheckpointError
from .config import ConfigError, HarmonizedConfig, TrainConfig, with_overrides
from .loop import train
from .optim import build_optimizer, decay_split, lr_at
from .trainer import RunState, Trainer

__all__ = ["TrainConfig", "HarmonizedConfig", "ConfigError", "CheckpointError", "train", "Trainer", "RunState",
           "with_overrides", "build_optimizer", "decay_split", "lr_at"]
