"""Integrations with other libraries (imported on demand: each needs its own extra).

* :mod:`hyperconn.integrations.transformers`: ``hyperconnect(model, ...)`` for Hugging
  Face decoder-only models (``pip install "hyperconn[hf]"``).
"""
