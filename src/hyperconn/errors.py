"""The one configuration error of hyperconn.

Every validated configuration (layer and variant options, :class:`~hyperconn.models.GPTConfig`,
the lab's ``TrainConfig``) raises :class:`ConfigError`, so a caller (the CLI, a sweep)
reads the offending field from ``error.field`` instead of parsing the message.
"""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """An invalid configuration value.

    Attributes:
        field: the dotted path of the offending field (``"model.n_embd"``, ``"sinkhorn_iters"``).
        message: what was expected and what was given, without the field.

    ``str(error)`` is ``"<field>: <message>"``. A ``ValueError`` subclass, so code that
    catches ``ValueError`` keeps working.
    """

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def within(self, prefix: str) -> "ConfigError":
        """The same error with ``prefix.`` prepended to its field (for nested configs)."""
        err = ConfigError(f"{prefix}.{self.field}" if prefix else self.field, self.message)
        err.__cause__ = self.__cause__
        return err

    def __reduce__(self):  # picklable across processes (sweeps, torchrun)
        return (ConfigError, (self.field, self.message))
