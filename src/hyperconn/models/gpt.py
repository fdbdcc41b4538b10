"""A decoder-only GPT whose every attention and MLP branch is hyper-connected.

Read top to bottom: RoPE → attention → SwiGLU → PreNorm → Block → GPT.

    tokens (B, T)
      → wte                                   (B, T, C)
      → expand_streams(·, n, offset)          (B, T, n, C)   copies + the init's zero-mean offset
      → for each block:  x = attn(x); x = mlp(x)            each a HyperConnection:
                         x ← H_res x + H_postᵀ F(H_pre x),  F = RMSNorm → attention / SwiGLU
      → reduce_streams                        (B, T, C)      mean over streams
      → RMSNorm → head                        (B, T, V)      logits

The norm lives *inside* each branch, so the branch sees ``RMSNorm(H_pre x)``: with
n = 1 and the residual variant this is exactly the usual Pre-Norm ``x + F(norm(x))``.

Init (GPT-2): N(0, 0.02) for embeddings and linear weights, and N(0, 0.02/√(2·n_layer))
for the two projections that write into the residual stream (attention ``proj``, MLP
``down``), so the stream's variance grows like a sum of 2·n_layer small terms. The
number of streams does *not* change this. At init every variant's static coefficients
have H_res rows summing to 1 (identity for hc/isohc/harmonized, doubly stochastic for
mhc/hybrid), H_post = 1 on every stream and H_pre summing to 1 over the streams. The
streams start as identical copies, so they stay identical: each one is exactly the n = 1
residual stream, and the final mean returns it. The hyper-connected model therefore
starts as (up to the α = 0.01 dynamic perturbation) its plain residual twin, with the
same residual growth; scaling the branch output by 1/√n or 1/n would only make it a
smaller-than-standard model. This matches the HC paper, which keeps the standard init.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..connection import HyperConnection, expand_streams, reduce_streams, stream_offsets
from ..reduction import LearnedReduce
from .config import GPTConfig

__all__ = ["GPT", "Rotary", "CausalSelfAttention", "SwiGLU", "PreNorm", "Block", "apply_rotary"]


# ----------------------------------------------------------------------------- RoPE
class Rotary(nn.Module):
    """cos / sin tables for rotary position embeddings, shape (seq_len, head_dim/2).

    Angles are computed in float64 and stored as float32, non-persistent buffers (they
    are a function of the config, so they stay out of the state dict). They follow the
    module's dtype when the model is cast (``model.double()`` etc.).
    """

    def __init__(self, head_dim: int, seq_len: int, base: float = 10000.0):
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)
        self.head_dim, self.seq_len = head_dim, seq_len

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, seq_len={self.seq_len}"

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[:seq_len], self.sin[:seq_len]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + D/2) of x (B, H, T, D) by position angles (T, D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


# ----------------------------------------------------------------------------- branches
class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with RoPE on q and k; no biases.

    forward(x (B, T, C), cos (T, D/2), sin (T, D/2)) → (B, T, C).
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_embd = config.n_head, config.n_embd
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)  # writes into the stream

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) · up(x)); no biases. (…, C) → (…, C)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.mlp_hidden_dim
        self.gate = nn.Linear(config.n_embd, hidden, bias=False)
        self.up = nn.Linear(config.n_embd, hidden, bias=False)
        self.down = nn.Linear(hidden, config.n_embd, bias=False)  # writes into the stream

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class PreNorm(nn.Module):
    """``fn(RMSNorm(x), *args)``: the branch F that a HyperConnection wraps."""

    def __init__(self, dim: int, fn: nn.Module, eps: float):
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=eps)
        self.fn = fn

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        h = self.norm(x)
        weight = self.norm.weight
        if h.dtype != weight.dtype and not torch.is_autocast_enabled(h.device.type):
            # Streams in another dtype than the parameters (GPTConfig.stream_dtype)
            # without autocast: the branch computes in the parameters' dtype.
            h = h.to(weight.dtype)
        return self.fn(h, *args)


# ----------------------------------------------------------------------------- block
class Block(nn.Module):
    """Two hyper-connected layers: attention (layer 2i), then MLP (layer 2i + 1).

    forward(x (B, T, n, C), cos, sin) → (B, T, n, C); with single-pass connections the
    state is the pair (streams (B, T, n, C), next branch input (B, T, C)).
    """

    def __init__(self, config: GPTConfig, index: int):
        super().__init__()
        C, n, eps = config.n_embd, config.connection.streams, config.norm_eps
        kwargs = dict(norm_eps=eps, **config.connection.layer_kwargs())
        self.attn = HyperConnection(C, n, PreNorm(C, CausalSelfAttention(config), eps),
                                    layer_index=2 * index, **kwargs)
        self.mlp = HyperConnection(C, n, PreNorm(C, SwiGLU(config), eps),
                                   layer_index=2 * index + 1, **kwargs)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = self.attn(x, cos, sin)  # extra arguments go to the branch
        return self.mlp(x)


# ----------------------------------------------------------------------------- model
class GPT(nn.Module):
    """Decoder-only GPT with hyper-connected branches.

    Args:
        config: a :class:`GPTConfig` (its ``connection`` picks the variant and streams).

    Shapes: ``forward(idx)`` takes integer tokens (B, T) with 1 ≤ T ≤ ``seq_len`` and
    returns float logits (B, T, vocab_size) in the parameters' dtype. Token values must
    lie in [0, vocab_size) (not checked: that would synchronise with the device; the
    embedding raises on CPU).

    Raises:
        ValueError: (naming ``idx``) for a tensor that is not 2-D integer with
            1 ≤ T ≤ seq_len; (naming the field) for an invalid config.

    Attributes: ``wte`` (token embedding), ``blocks`` (ModuleList of :class:`Block`),
    ``norm`` (final RMSNorm), ``head`` (Linear, weight tied to ``wte`` by default),
    ``rotary`` (shared RoPE tables). ``connections()`` lists the 2·n_layer
    :class:`HyperConnection` layers in forward order; for Harmonized HC pass the model to
    ``hyperconn.HarmonizedController``.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise ValueError(f"config: expected a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.rotary = Rotary(config.head_dim, config.seq_len, config.rope_base)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        # n → 1: the mean (default, the residual equivalence) or learned per-token gates.
        self.reduce = LearnedReduce(config.n_embd, config.connection.streams, norm_eps=config.norm_eps) \
            if config.reduce == "learned" else None
        if config.connection.offset:  # the fixed zero-mean expansion pattern, built once
            self.register_buffer("stream_pattern", stream_offsets(config.connection.streams, config.n_embd),
                                 persistent=False)
        else:
            self.stream_pattern = None
        self.norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.wte.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 init of embeddings and linear weights (see the module docstring).
        Connection coefficients and norm weights keep their own init."""
        std = 0.02
        nn.init.normal_(self.wte.weight, 0.0, std)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.head.weight, 0.0, std)
        for block in self.blocks:
            attn, mlp = block.attn.branch.fn, block.mlp.branch.fn
            for linear in (attn.qkv, mlp.gate, mlp.up):
                nn.init.normal_(linear.weight, 0.0, std)
            for linear in (attn.proj, mlp.down):
                nn.init.normal_(linear.weight, 0.0, std / math.sqrt(2 * self.config.n_layer))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.is_floating_point() \
                or idx.is_complex() or idx.dtype == torch.bool:
            raise ValueError(f"idx: expected an integer tensor of shape (B, T), got "
                             f"{getattr(idx, 'dtype', type(idx).__name__)} {tuple(getattr(idx, 'shape', ()))}")
        T = idx.shape[1]
        if not 1 <= T <= self.config.seq_len:
            raise ValueError(f"idx: sequence length {T} must be in [1, seq_len={self.config.seq_len}]")
        cos, sin = self.rotary(T)
        h = self.wte(idx)
        if self.config.stream_dtype is not None:
            h = h.to(getattr(torch, self.config.stream_dtype))
        conn = self.config.connection
        x = expand_streams(h, conn.streams, offset=conn.offset, pattern=self.stream_pattern)  # (B, T, n, C)
        k = self.config.recompute_interval
        if k and self.training and torch.is_grad_enabled():
            # Block recompute: only each segment's input state is stored; its k blocks run
            # again in backward (the RNG state is restored, so dropout-free or not, the
            # recompute equals the forward).
            for start in range(0, len(self.blocks), k):
                x = checkpoint(self._run_blocks, x, cos, sin, start, start + k, use_reentrant=False)
        else:
            x = self._run_blocks(x, cos, sin, 0, len(self.blocks))
        if isinstance(x, tuple):
            # Single-pass layers carry (streams, next read): the last layer's predicted read is
            # the n → 1 contraction (as DeepSeek V4.1 / Megatron-LM), unless reduce="learned".
            x = self.reduce(x[0]) if self.reduce is not None else x[1]
        else:
            x = self.reduce(x) if self.reduce is not None else reduce_streams(x)
        x = x.to(self.norm.weight.dtype)  # (B, T, C)
        return self.head(self.norm(x))

    def _run_blocks(self, x, cos, sin, start: int, stop: int):
        for block in self.blocks[start:stop]:
            x = block(x, cos, sin)
        return x

    def connections(self) -> list[HyperConnection]:
        """The 2·n_layer HyperConnections in forward order: block0.attn, block0.mlp, …"""
        return [hc for block in self.blocks for hc in (block.attn, block.mlp)]

    def num_params(self, non_embedding: bool = False) -> int:
        """Number of parameters (a tied weight counts once). ``non_embedding=True``
        leaves out the vocabulary matrices (token embedding and, when untied, the head),
        so it is the same for tied and untied models."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.wte.weight.numel()
            if not self.config.tie_embeddings:
                total -= self.head.weight.numel()
        return total

    def extra_repr(self) -> str:
        conn = sum(p.numel() for hc in self.connections()
                   for name, p in hc.named_parameters() if not name.startswith("branch."))
        return (f"{self.config.connection.describe()}, params={self.num_params():,} "
                f"(non-embedding {self.num_params(non_embedding=True):,}, connections {conn:,})")
