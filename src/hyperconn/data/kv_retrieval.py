"""Synthetic key-value retrieval task (docs/design.md §3).

Layout of one sequence of length ``T = seq_len`` with ``P = pairs``::

    position:  0   1   2   3  ...  2P-2 2P-1 | 2P ... T-P-1 | T-P ... T-1
    input:     k1  v1  k2  v2 ...  kP   vP   | 0  ...  0    | q1  ...  qP
    target:    -100 everywhere ...                          | val(q1) ... val(qP)

* keys ``k_i`` are distinct within a sequence, drawn from ``[0, vocab // 2)``;
* values ``v_i`` are drawn independently (repeats allowed) from ``[vocab // 2, vocab)``;
* filler is token 0 (which is also a valid key; the query block is identified by position);
* the query block ``q_1 .. q_P`` is a uniformly random permutation of the ``P`` keys.

Target convention (causal next-token LM). With ``logits = model(inputs)`` of shape
``(B, T, V)`` where ``logits[:, t]`` may only depend on ``inputs[:, :t + 1]``,
``targets[b, t]`` is the value paired with the key ``inputs[b, t]`` when ``t`` is a query
position (``t >= T - P``) and ``IGNORE_INDEX = -100`` everywhere else. Hence
``F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-100)`` is exactly the
mean loss over the ``B * P`` query positions. Note: targets are *not* ``inputs`` shifted by
one; the model answers at the position that holds the query key itself.

Train/eval disjointness. Every generated sequence is assigned to a split by a fixed,
seed-independent hash of its tokens (:func:`sequence_split`); training batches contain only
"train"-hashed sequences and eval batches only "eval"-hashed ones (rejection sampling), so no
eval sequence can ever appear in training, for any seed. Batches are also drawn from
different RNG streams: batch ``step`` of split ``s`` is generated from a ``torch.Generator``
seeded by ``derive_seed(seed, "kv", s, step)``, which makes every batch random-access.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
_SPLITS = ("train", "eval")
_HASH_P = 2_147_483_647  # Mersenne prime 2**31 - 1
_HASH_BASE = 1_000_003


def derive_seed(*parts: object) -> int:
    """Stable 63-bit seed from any tuple of printable parts (same on every machine/run)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _generator(*parts: object) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(derive_seed(*parts))
    return g


def sequence_split(content: torch.Tensor) -> torch.Tensor:
    """Split id of each sequence: 0 = train, 1 = eval.

    ``content`` is an int64 tensor of shape ``(N, L)`` holding the tokens that determine a
    sequence (pairs then queries). Returns an int64 tensor of shape ``(N,)``.
    The hash is a polynomial hash mod ``2**31 - 1`` followed by a squaring mix; it does not
    depend on any seed, so the partition is the same for every dataset instance.
    """
    n = content.shape[1]
    powers = torch.empty(n, dtype=torch.int64)
    acc = 1
    for i in range(n - 1, -1, -1):
        powers[i] = acc
        acc = acc * _HASH_BASE % _HASH_P
    h = ((content + 1) * powers % _HASH_P).sum(dim=1) % _HASH_P  # each term < 2**31
    h = (h * h + 12345) % _HASH_P
    return (h >> 3) & 1


def masked_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats) over positions where ``targets != IGNORE_INDEX``.

    ``logits``: ``(..., V)`` float; ``targets``: ``(...)`` int64. Returns a 0-dim tensor
    (differentiable w.r.t. ``logits``).
    """
    v = logits.shape[-1]
    return F.cross_entropy(
        logits.reshape(-1, v).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


def masked_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Fraction of positions with ``targets != IGNORE_INDEX`` where ``argmax(logits) == target``.

    ``logits``: ``(..., V)``; ``targets``: ``(...)``. Returns a 0-dim float tensor on the
    logits' device (``.item()`` it yourself). Raises ``ValueError`` if no position is scored.
    """
    mask = targets != IGNORE_INDEX
    count = int(mask.sum())
    if count == 0:
        raise ValueError("targets has no scored position (all are IGNORE_INDEX=-100)")
    correct = (logits.argmax(dim=-1) == targets) & mask
    return correct.sum().float() / count


class KVRetrieval:
    """Key-value retrieval batches for a causal LM (see the module docstring for the layout).

    Args:
        pairs: number of key-value pairs ``P`` per sequence (``1 <= P <= vocab // 2``).
        seq_len: sequence length ``T`` (needs ``3 * P <= T``).
        vocab: vocabulary size ``V >= 4``; keys ``[0, V // 2)``, values ``[V // 2, V)``.
        seed: base seed; same seed gives the same batches.

    All batches are ``(inputs, targets)``, both int64 CPU tensors of shape
    ``(batch_size, seq_len)``.
    """

    ignore_index = IGNORE_INDEX

    def __init__(self, pairs: int = 8, seq_len: int = 256, vocab: int = 256, seed: int = 0):
        for name, val in (("pairs", pairs), ("seq_len", seq_len), ("vocab", vocab), ("seed", seed)):
            if not isinstance(val, int) or isinstance(val, bool):
                raise ValueError(f"{name} must be an int, got {val!r}")
        if vocab < 4:
            raise ValueError(f"vocab={vocab} is too small: need vocab >= 4")
        if pairs < 1:
            raise ValueError(f"pairs={pairs} must be >= 1")
        if pairs > vocab // 2:
            raise ValueError(
                f"pairs={pairs} exceeds the {vocab // 2} distinct keys available with vocab={vocab}"
            )
        if 3 * pairs > seq_len:
            raise ValueError(
                f"pairs={pairs} do not fit in seq_len={seq_len}: need 3*pairs <= seq_len"
            )
        self.pairs, self.seq_len, self.vocab, self.seed = pairs, seq_len, vocab, seed

    @property
    def vocab_size(self) -> int:
        return self.vocab

    @property
    def num_keys(self) -> int:
        return self.vocab // 2

    @property
    def query_slice(self) -> slice:
        """Positions holding queries (the only scored positions): ``slice(T - P, T)``."""
        return slice(self.seq_len - self.pairs, self.seq_len)

    @property
    def chance_accuracy(self) -> float:
        """Accuracy of guessing uniformly among the ``P`` values in context: ``1 / P``."""
        return 1.0 / self.pairs

    def _candidates(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``n`` sequences; returns content ``(n, 3P)`` and query values ``(n, P)``."""
        p, half = self.pairs, self.vocab // 2
        keys = torch.rand(n, half, generator=g).argsort(dim=1)[:, :p]
        values = torch.randint(half, self.vocab, (n, p), generator=g)
        perm = torch.rand(n, p, generator=g).argsort(dim=1)
        pairs = torch.stack([keys, values], dim=2).reshape(n, 2 * p)
        content = torch.cat([pairs, keys.gather(1, perm)], dim=1)
        return content, values.gather(1, perm)

    def batch(self, step: int, batch_size: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number ``step`` of ``split`` ("train" or "eval"), random access.

        Returns ``(inputs, targets)``, int64 tensors of shape ``(batch_size, seq_len)``.
        """
        if split not in _SPLITS:
            raise ValueError(f"split={split!r} must be one of {_SPLITS}")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        want = _SPLITS.index(split)
        g = _generator(self.seed, "kv", split, step)
        got_c, got_v, have = [], [], 0
        for _ in range(1000):
            content, qvals = self._candidates(2 * (batch_size - have) + 8, g)
            keep = sequence_split(content) == want
            got_c.append(content[keep])
            got_v.append(qvals[keep])
            have += int(keep.sum())
            if have >= batch_size:
                break
        else:
            raise RuntimeError(
                f"could not draw {split} sequences: the sequence space for pairs={self.pairs}, "
                f"vocab={self.vocab} is too small to split into train and eval"
            )
        content = torch.cat(got_c)[:batch_size]
        qvals = torch.cat(got_v)[:batch_size]
        p, t = self.pairs, self.seq_len
        inputs = torch.zeros(batch_size, t, dtype=torch.int64)
        inputs[:, : 2 * p] = content[:, : 2 * p]
        inputs[:, t - p :] = content[:, 2 * p :]
        targets = torch.full((batch_size, t), IGNORE_INDEX, dtype=torch.int64)
        targets[:, t - p :] = qvals
        return inputs, targets

    def train_batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Training batch number ``step`` (deterministic in ``(seed, step)``), shape ``(B, T)``."""
        return self.batch(step, batch_size, "train")

    def train_batches(self, batch_size: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Infinite iterator of ``train_batch(s, batch_size)`` for ``s = start_step, start_step+1, ...``.

        The ``k``-th item equals ``train_batch(start_step + k, batch_size)``, so a training
        loop resumes exactly by passing ``start_step``.
        """
        step = start_step
        while True:
            yield self.train_batch(step, batch_size)
            step += 1

    def eval_batches(self, batch_size: int, num_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``num_batches`` held-out batches ``(B, T)``; always the same for a given seed."""
        for i in range(num_batches):
            yield self.batch(i, batch_size, "eval")

    accuracy = staticmethod(masked_accuracy)
    loss = staticmethod(masked_loss)

    def __repr__(self) -> str:
        return (f"KVRetrieval(pairs={self.pairs}, seq_len={self.seq_len}, "
                f"vocab={self.vocab}, seed={self.seed})")

