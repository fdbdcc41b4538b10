"""Training: config, loop, optimizer/schedule, checkpoints, metrics (see docs/training.md).

    >>> from hyperconn.train import TrainConfig, train
    >>> from hyperconn.models import GPTConfig, ConnectionConfig
    >>> cfg = TrainConfig(model=GPTConfig(n_layer=2, n_embd=32, seq_len=32,
    ...                                   connection=ConnectionConfig("mhc", streams=4)),
    ...                   kv_pairs=4, steps=20, out_dir="runs/demo", quiet=True)
    >>> summary = train(cfg)          # doctest: +SKIP
"""

from .checkpoint import CheckpointError
from .config import ConfigError, HarmonizedConfig, TrainConfig, with_overrides
from .loop import train
from .optim import build_optimizer, decay_split, lr_at

__all__ = ["TrainConfig", "HarmonizedConfig", "ConfigError", "CheckpointError", "train",
           "with_overrides", "build_optimizer", "decay_split", "lr_at"]
