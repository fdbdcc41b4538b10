"""GPT-style decoder with hyper-connected branches (RMSNorm, RoPE, SwiGLU).

    >>> import torch
    >>> from hyperconn.models import GPT, GPTConfig, ConnectionConfig
    >>> cfg = GPTConfig(n_layer=2, n_embd=64, connection=ConnectionConfig("mhc", streams=4))
    >>> GPT(cfg)(torch.randint(0, 256, (2, 16))).shape
    torch.Size([2, 16, 256])
"""

from .config import ConnectionConfig, GPTConfig
from .gpt import GPT

__all__ = ["GPT", "GPTConfig", "ConnectionConfig"]
