"""Hyper-connect a Hugging Face decoder-only model in place: ``hyperconnect(model, ...)``.

    from transformers import LlamaConfig, LlamaForCausalLM
    from hyperconn.integrations.transformers import hyperconnect
    import hyperconn, torch

    model = hyperconnect(LlamaForCausalLM(LlamaConfig(...)), streams=4, variant="mhc")
    opt = torch.optim.AdamW(hyperconn.param_groups(model, weight_decay=0.1), lr=3e-4)

What changes: both sublayers (attention, MLP) of every decoder layer become
:class:`~hyperconn.HyperConnection` s around the layer's own norm + module (layer ``i``'s
sublayers get ``layer_index`` 2i and 2i + 1); the first decoder layer expands its input
into n streams, the last reduces them (mean) before the model's final norm. Between
layers the streams travel as one ``(B, T, n·C)`` tensor, so the model's own loop, masks,
position ids / embeddings, KV cache and ``generate()`` work unchanged. Each decoder layer
keeps its class (a subclass is swapped in), its submodule names and therefore its weight
names; the connections add ``hc_attn.*`` and ``hc_mlp.*`` parameters.

* ``output_hidden_states``: entry 0 is the embeddings ``(B, T, C)``; the outputs of every
  decoder layer but the last are the flattened streams ``(B, T, n·C)``
  (``.unflatten(-1, (n, C))`` gives ``(B, T, n, C)``); the last entries are ``(B, T, C)``.
* Saving and loading: ``save_pretrained`` records the options in ``config.hyperconn``;
  :func:`from_pretrained` rebuilds the model from its config, hyper-connects it with
  those options and loads every weight.
* ``streams=1, variant="residual"`` computes exactly what the original model computes.

Supported: Llama, Qwen2, Qwen3, Mistral (``input_layernorm``/``self_attn``/
``post_attention_layernorm``/``mlp`` layers) and GPT-2 (``ln_1``/``attn``/``ln_2``/``mlp``,
without cross-attention). Other architectures raise ``ValueError`` naming them.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .._dtypes import compute_dtype
from ..connection import HyperConnection, expand_streams, reduce_streams
from .._checks import is_offset
from ..inits import DEFAULT_INIT, expansion_offset

__all__ = ["hyperconnect", "from_pretrained", "SUPPORTED"]

# model_type -> (path of the decoder layer list, attention, its norm, MLP, its norm)
_LAYOUTS = {
    "llama": ("model.layers", "self_attn", "input_layernorm", "mlp", "post_attention_layernorm"),
    "mistral": ("model.layers", "self_attn", "input_layernorm", "mlp", "post_attention_layernorm"),
    "qwen2": ("model.layers", "self_attn", "input_layernorm", "mlp", "post_attention_layernorm"),
    "qwen3": ("model.layers", "self_attn", "input_layernorm", "mlp", "post_attention_layernorm"),
    "gpt2": ("transformer.h", "attn", "ln_1", "mlp", "ln_2"),
}
SUPPORTED = tuple(_LAYOUTS)
_CONFIG_KEY = "hyperconn"


def _sublayer(layer: nn.Module, names: tuple[str, str], h: torch.Tensor, **kwargs) -> torch.Tensor:
    """``module(norm(h))`` of a decoder layer's attention or MLP; an attention's tuple
    output is reduced to its hidden state (the loop never uses the weights)."""
    module, norm = names
    out = getattr(layer, module)(getattr(layer, norm)(h), **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _hyperconnected_forward(self, hidden_states, *args, **kwargs):
    """Decoder-layer forward with both sublayers hyper-connected (see the module doc)."""
    n, C = self.hc_attn.streams, self.hc_attn.dim
    if self._hc_layout == "gpt2":
        # GPT2Model passes (hidden, cache, attention_mask, encoder_hidden_states) by position.
        kwargs.update(zip(("cache", "attention_mask", "encoder_hidden_states"), args))
        args = ()
        if kwargs.pop("encoder_hidden_states", None) is not None:
            raise ValueError("hyperconnect: GPT-2 cross-attention (encoder_hidden_states) is not supported")
        kwargs.pop("encoder_attention_mask", None)
    if args:
        raise ValueError(f"hyperconnect: unexpected positional arguments to {type(self).__name__}")
    x = expand_streams(hidden_states, n, offset=self._hc_offset) if self._hc_first else hidden_states.unflatten(-1, (n, C))
    h, finish = self.hc_attn.pre(x)
    x = finish(_sublayer(self, self._hc_attn_names, h, **kwargs))
    h, finish = self.hc_mlp.pre(x)
    x = finish(_sublayer(self, self._hc_mlp_names, h))
    return reduce_streams(x) if self._hc_last else x.flatten(-2)


def _layers(model: nn.Module, path: str) -> nn.ModuleList:
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ValueError(f"model: expected a {path} module list, not found")
    return obj


def hyperconnect(model: nn.Module, streams: int = 4, variant: str = "mhc", **options: Any) -> nn.Module:
    """Hyper-connect every decoder layer of a Hugging Face causal LM in place; returns it.

    Args:
        model: a ``*ForCausalLM`` (or its base ``*Model``) of a supported architecture
            (``SUPPORTED``: llama, mistral, qwen2, qwen3, gpt2).
        streams: residual streams n (1 with ``variant="residual"``).
        variant: one of ``hyperconn.VARIANTS``.
        **options: any :class:`~hyperconn.HyperConnection` keyword (``dynamic``,
            ``res_init``, ``recompute``, ``init``, ``sinkhorn_iters``, ``iso_method``, ...),
            and ``stream_offset`` (None: the init scheme's, 0.1 for the default; the
            first layer expands the hidden state with it).

    Raises:
        ValueError: for an unsupported or already hyper-connected model, or invalid
            layer options (the message names the argument).
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _LAYOUTS:
        raise ValueError(f"model: hyperconnect supports {SUPPORTED}, got model_type {model_type!r} "
                         f"({type(model).__name__})")
    if getattr(config, _CONFIG_KEY, None):
        raise ValueError("model: already hyper-connected (config.hyperconn is set)")
    path, attn, attn_norm, mlp, mlp_norm = _LAYOUTS[model_type]
    try:  # a *ForCausalLM holds the base model; a base model holds the layers itself
        layers = _layers(model, path)
    except ValueError:
        layers = _layers(model, path.split(".", 1)[1])
    C = config.hidden_size if hasattr(config, "hidden_size") else config.n_embd
    last = len(layers) - 1
    options = dict(options)
    offset = options.pop("stream_offset", None)
    if offset is None:  # the init scheme's expansion (0.1 for the default)
        offset = expansion_offset(options.get("init", DEFAULT_INIT), variant)
    if not is_offset(offset):
        raise ValueError(f"stream_offset: expected None or a finite number >= 0, got {offset!r}")
    for i, layer in enumerate(layers):
        if getattr(layer, "_hc_layout", None):
            raise ValueError("model: already hyper-connected")
        ref = next(layer.parameters())
        # Coefficients in fp32 (fp64 for a float64 model) whatever the model's dtype.
        cdtype = compute_dtype(ref)
        for name, index in (("hc_attn", 2 * i), ("hc_mlp", 2 * i + 1)):
            hc = HyperConnection(C, streams, None, variant=variant, layer_index=index, **options)
            setattr(layer, name, hc.to(device=ref.device, dtype=cdtype))
        layer._hc_attn_names, layer._hc_mlp_names = (attn, attn_norm), (mlp, mlp_norm)
        layer._hc_layout = "gpt2" if model_type == "gpt2" else "llama"
        layer._hc_first, layer._hc_last = i == 0, i == last
        layer._hc_offset = float(offset)
        cls = type(layer)
        layer.__class__ = type(f"HyperConnected{cls.__name__}", (cls,), {"forward": _hyperconnected_forward})
    setattr(config, _CONFIG_KEY, {"streams": streams, "variant": variant, "stream_offset": float(offset), **options})
    return model


def from_pretrained(path: str | os.PathLike, model_class: type | None = None, **kwargs: Any) -> nn.Module:
    """Load a model saved with ``save_pretrained`` after :func:`hyperconnect`.

    Builds the model from its config, hyper-connects it with the options recorded in
    ``config.hyperconn`` and loads every weight (the connections' included).

    Args:
        path: the directory ``save_pretrained`` wrote.
        model_class: the class to build (default ``AutoModelForCausalLM``).
        **kwargs: passed to ``AutoConfig.from_pretrained``.

    Raises:
        ValueError: if the saved config has no ``hyperconn`` entry, or weights are
            missing or unexpected.
    """
    from pathlib import Path

    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, **kwargs)
    options = dict(getattr(config, _CONFIG_KEY, None) or {})
    if not options:
        raise ValueError(f"path: {path} was not saved from a hyper-connected model (no config.hyperconn)")
    delattr(config, _CONFIG_KEY)
    options = dict(options)
    # Saved before the expansion offset was recorded: those models expanded exact copies.
    options.setdefault("stream_offset", 0.0)
    model = (model_class or AutoModelForCausalLM).from_config(config)
    hyperconnect(model, **options)
    state = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"path: weights do not match the hyper-connected model (missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]})")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model
