"""Controllers: feedback that a variant applies to its layers between training steps.

A variant that needs one (Harmonized HC's gain controller) names it in its class
(``Variant.controller``); nothing outside that variant's file knows what it does.
The training loop only calls, for every controller :func:`build_controllers` returns::

    controller.step(reduce)        after each training backward (reduce: mean over ranks)
    controller.metrics()           scalars for the metrics line, e.g. {"harmonized_scale": …}
    controller.state_dict()        into the checkpoint, under ``controller.name``
    controller.load_state_dict(d)  on resume

A controller observes the layers through :meth:`hyperconn.HyperConnection.register_observer`,
so it chains with the probe and with other observers instead of replacing them.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

from torch import nn

__all__ = ["Controller", "build_controllers", "Reduce"]

# reduce(values) -> the same values averaged over data-parallel ranks (identity in one process).
Reduce = Callable[[Sequence[float]], Sequence[float]]


class Controller:
    """Base class of the controllers variants supply (see the module docstring).

    Subclasses set ``name`` (the key of their state in checkpoints and summaries, and of
    their settings in :func:`build_controllers`) and implement the four methods.
    """

    name: str = "controller"

    def step(self, reduce: Optional[Reduce] = None) -> None:
        """One control step after a training forward (and, in the loop, its backward)."""
        raise NotImplementedError

    def metrics(self) -> dict:
        """Scalars logged with each metrics line (empty by default)."""
        return {}

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Detach from the layers (remove observer handles). Idempotent."""


def build_controllers(model: nn.Module, settings: Optional[Mapping[str, Mapping]] = None) -> list[Controller]:
    """One controller per variant class in ``model`` that declares one, in the order the
    variants first appear in ``model.modules()``.

    Args:
        model: any module containing :class:`~hyperconn.HyperConnection` layers.
        settings: keyword arguments per controller name, e.g.
            ``{"harmonized": {"target_gain": 12.0}}``; missing names take the defaults.

    Raises:
        ConfigError: from a controller's own validation of its settings.
    """
    from .connection import HyperConnection  # the layer imports the variants, which import this

    settings = dict(settings or {})
    seen: list[type] = []
    for module in model.modules():
        if isinstance(module, HyperConnection):
            cls = type(module.mixer)
            if cls.controller is not None and cls not in seen:
                seen.append(cls)
    return [cls.controller(model, **dict(settings.get(cls.controller.name, {}))) for cls in seen]


def __getattr__(name):
    # The Harmonized controller lives with its variant; kept importable from here for
    # code written before the registry.
    if name == "HarmonizedController":
        from .variants.harmonized import HarmonizedController
        return HarmonizedController
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
