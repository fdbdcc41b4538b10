"""Datasets: synthetic key-value retrieval and byte-level text (see docs/data.md).

Both yield ``(inputs, targets)`` int64 tensors of shape ``(batch_size, seq_len)`` for a
causal LM; positions with ``targets == IGNORE_INDEX`` are not scored.
"""

from .byte_text import ByteText, CorpusError, bits_per_byte
from .kv_retrieval import IGNORE_INDEX, KVRetrieval, masked_accuracy, masked_loss

__all__ = ["IGNORE_INDEX", "KVRetrieval", "ByteText", "CorpusError", "bits_per_byte", "masked_accuracy", "masked_loss"]
