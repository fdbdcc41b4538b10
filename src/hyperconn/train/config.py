"""TrainConfig: everything one training run needs, as a validated dataclass.

``TrainConfig`` nests the model's :class:`~hyperconn.models.GPTConfig` (which nests its
:class:`~hyperconn.models.ConnectionConfig`) and the Harmonized controller's settings
(:class:`HarmonizedConfig`). All three validate themselves on construction. Everything
this module raises for an invalid value is a :class:`~hyperconn.errors.ConfigError` with
the dotted path of the field (``error.field == "model.connection.streams"``) and
``str(error)`` starting with it, e.g. ``"lr: expected a finite number > 0, got -1.0"``.

Conversions: :meth:`TrainConfig.to_dict` (plain nested dict, what ``config.json`` holds),
:meth:`TrainConfig.from_dict` (rejects unknown keys, naming them with their dotted path)
and :func:`with_overrides` (``{"model.n_embd": 64, "steps": 100}``).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from ..errors import ConfigError
from ..models import GPTConfig

__all__ = ["ConfigError", "HarmonizedConfig", "TrainConfig", "with_overrides", "flatten", "TASKS"]

TASKS = ("kv", "bytes")
SCHEDULES = ("cosine", "constant")
DEVICES = ("auto", "cpu", "cuda")
PARALLEL = ("ddp", "fsdp")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int_at_least(name: str, v, lo: int) -> None:
    if not _is_int(v) or v < lo:
        raise ConfigError(name, f"expected an integer >= {lo}, got {v!r}")


def _num_in(name: str, v, lo: float, hi: float, lo_open=False, hi_open=False) -> None:
    ok = _is_num(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        if hi == math.inf:
            want = f"a finite number > {lo:g}" if lo_open else f"a finite number >= {lo:g}"
        else:
            lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
            want = f"a number in {lb}{lo:g}, {hi:g}{rb}"
        raise ConfigError(name, f"expected {want}, got {v!r}")


def _choice(name: str, v, choices) -> None:
    if v not in choices:
        raise ConfigError(name, f"expected one of {choices}, got {v!r}")


@dataclass
class HarmonizedConfig:
    """Feedback controller of Harmonized HC (used only when the model has harmonized layers)."""

    target_gain: float = 12.0
    """composite gain the controller holds the model near"""
    beta: float = 0.95
    """EMA factor of the measured gain, in [0, 1)"""
    exponent: float = 0.5
    """controller exponent k: s <- s * (target / ema)^k"""
    min_scale: float = 0.02
    """lower clip of the scale s, in (0, 1]; hits are counted as floor_hits"""
    gain: str = "forward"
    """gain fed back: "forward" (max row sum of the composite) or "max" (the larger of its
    row and column Amax, as the Harmonized HC source does)"""

    def __post_init__(self):
        _num_in("harmonized.target_gain", self.target_gain, 0.0, math.inf, lo_open=True, hi_open=True)
        _num_in("harmonized.beta", self.beta, 0.0, 1.0, hi_open=True)
        _num_in("harmonized.exponent", self.exponent, 0.0, math.inf, lo_open=True, hi_open=True)
        _num_in("harmonized.min_scale", self.min_scale, 0.0, 1.0, lo_open=True)
        if self.gain not in ("forward", "max"):
            raise ConfigError("harmonized.gain", f"expected 'forward' or 'max', got {self.gain!r}")


@dataclass
class TrainConfig:
    """Train a GPT with hyper-connections on key-value retrieval or byte-level text."""

    model: GPTConfig = field(default_factory=GPTConfig)
    """the model (its connection picks the variant)"""
    out_dir: str = "runs/train"
    """run directory: config.json, metrics.jsonl, checkpoint.pt, summary.json"""
    task: Literal["kv", "bytes"] = "kv"
    """kv: key-value retrieval; bytes: byte-level language modelling"""
    kv_pairs: int = 8
    """key-value pairs per sequence (kv task); chance accuracy is 1/kv_pairs"""
    data_paths: list[str] = field(default_factory=list)
    """text files / directories / globs for the bytes task; empty = the Python stdlib sources"""
    steps: int = 1000
    """optimizer steps of the whole run"""
    batch_size: int = 32
    """sequences per step (also per eval batch); global under torchrun: a multiple of the world size, split over ranks"""
    lr: float = 1e-3
    """peak learning rate"""
    warmup_steps: int = 100
    """linear warmup from lr/warmup_steps to lr"""
    schedule: Literal["cosine", "constant"] = "cosine"
    """after warmup: cosine decay to min_lr_ratio*lr at the last step, or constant"""
    min_lr_ratio: float = 0.1
    """final learning rate as a fraction of lr (cosine)"""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay on weight matrices (see docs/training.md)"""
    beta1: float = 0.9
    """AdamW beta1"""
    beta2: float = 0.95
    """AdamW beta2"""
    grad_clip: float = 0.0
    """clip the global gradient norm to this value; 0 = off (as in the papers)"""
    eval_every: int = 100
    """evaluate every this many steps (and always at the end); 0 = only at the end"""
    eval_batches: int = 4
    """held-out batches per evaluation"""
    log_every: int = 1
    """write a metrics.jsonl line every this many steps (loss is the mean since the last line)"""
    ckpt_every: int = 0
    """write checkpoint.pt every this many steps (and always at the end); 0 = only at the end"""
    seed: int = 0
    """seeds model init and training batches (the held-out data never depends on it)"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = cuda when available, else cpu; bf16 autocast is used on cuda only"""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """under torchrun (WORLD_SIZE > 1): ddp = DistributedDataParallel, fsdp = FSDP2 fully_shard; ignored in one process"""
    threads: int = 0
    """torch CPU threads during the run (0 = torch's default); 1 avoids oversubscription on busy CPUs"""
    quiet: bool = False
    """no progress bar or console output"""
    diagnostics: bool = True
    """run the stability probe on the first eval batch at every evaluation"""
    tensorboard: bool = False
    """also write metrics and diagnostics as TensorBoard events in out_dir/tensorboard (pip install 'hyperconn[tensorboard]')"""
    harmonized: HarmonizedConfig = field(default_factory=HarmonizedConfig)
    """Harmonized HC controller (ignored unless the variant is harmonized)"""
    resume: bool = False
    """continue from out_dir/checkpoint.pt if it exists (else start fresh: the directory's previous run is removed first)"""
    stop_after: int = 0
    """stop (with a checkpoint, status "stopped") once this many steps are done; 0 = off"""
    allow_config_change: bool = False
    """with resume: continue even though a setting that alters the trajectory (seed, lr, batch size, steps, ...) changed; recorded in run.json"""

    def __post_init__(self):
        if isinstance(self.model, Mapping):
            self.model = _build(GPTConfig, self.model, "model.")
        if isinstance(self.harmonized, Mapping):
            self.harmonized = _build(HarmonizedConfig, self.harmonized, "harmonized.")
        if not isinstance(self.model, GPTConfig):
            raise ConfigError("model", f"expected a GPTConfig, got {type(self.model).__name__}")
        if not isinstance(self.harmonized, HarmonizedConfig):
            raise ConfigError("harmonized", f"expected a HarmonizedConfig, got {type(self.harmonized).__name__}")
        if not isinstance(self.out_dir, str) or not self.out_dir:
            raise ConfigError("out_dir", f"expected a non-empty path, got {self.out_dir!r}")
        _choice("task", self.task, TASKS)
        _int_at_least("kv_pairs", self.kv_pairs, 1)
        m = self.model
        if self.task == "kv":
            if m.vocab_size < 4:
                raise ConfigError("model.vocab_size", f"the kv task needs vocab_size >= 4, got {m.vocab_size}")
            if self.kv_pairs > m.vocab_size // 2:
                raise ConfigError("kv_pairs", f"at most vocab_size // 2 = {m.vocab_size // 2} distinct keys, "
                                              f"got {self.kv_pairs}")
            if 3 * self.kv_pairs > m.seq_len:
                raise ConfigError("kv_pairs", f"{self.kv_pairs} pairs need 3*kv_pairs <= model.seq_len "
                                              f"= {m.seq_len}")
        if self.task == "bytes" and m.vocab_size < 256:
            raise ConfigError("model.vocab_size", f"the bytes task needs vocab_size >= 256, got {m.vocab_size}")
        if not isinstance(self.data_paths, (list, tuple)) or not all(isinstance(p, str) for p in self.data_paths):
            raise ConfigError("data_paths", f"expected a list of paths, got {self.data_paths!r}")
        self.data_paths = list(self.data_paths)
        _int_at_least("steps", self.steps, 1)
        _int_at_least("batch_size", self.batch_size, 1)
        _num_in("lr", self.lr, 0.0, math.inf, lo_open=True, hi_open=True)
        _int_at_least("warmup_steps", self.warmup_steps, 0)
        _choice("schedule", self.schedule, SCHEDULES)
        _num_in("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _num_in("weight_decay", self.weight_decay, 0.0, math.inf, hi_open=True)
        _num_in("beta1", self.beta1, 0.0, 1.0, hi_open=True)
        _num_in("beta2", self.beta2, 0.0, 1.0, hi_open=True)
        _num_in("grad_clip", self.grad_clip, 0.0, math.inf, hi_open=True)
        _int_at_least("eval_every", self.eval_every, 0)
        _int_at_least("eval_batches", self.eval_batches, 1)
        _int_at_least("log_every", self.log_every, 1)
        _int_at_least("ckpt_every", self.ckpt_every, 0)
        _int_at_least("seed", self.seed, 0)
        if self.seed >= 2**20:  # training windows of the bytes task are offset by seed * 10^7
            raise ConfigError("seed", f"expected an integer < {2**20}, got {self.seed}")
        _choice("device", self.device, DEVICES)
        _choice("parallel", self.parallel, PARALLEL)
        _int_at_least("threads", self.threads, 0)
        _int_at_least("stop_after", self.stop_after, 0)
        for name in ("quiet", "diagnostics", "resume"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"expected true or false, got {getattr(self, name)!r}")

    # ------------------------------------------------------------------ conversions
    def to_dict(self) -> dict:
        """Plain nested dict (JSON-serialisable); ``from_dict(to_dict())`` round-trips."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        """Build from a nested dict (e.g. a parsed TOML/YAML file); missing keys keep their
        defaults. Raises :class:`ConfigError` naming an unknown key or an invalid value."""
        return _build(cls, data, "")

    def controller_settings(self) -> dict[str, dict]:
        """Keyword arguments per controller name, for :func:`hyperconn.control.build_controllers`
        (a controller the model does not need ignores its entry)."""
        return {"harmonized": dataclasses.asdict(self.harmonized)}

    @property
    def variant(self) -> str:
        return self.model.connection.variant

    @property
    def metric(self) -> str:
        """Headline held-out metric: ``eval_accuracy`` (kv, higher is better) or
        ``eval_bpb`` (bytes, lower is better)."""
        return "eval_accuracy" if self.task == "kv" else "eval_bpb"

    def describe(self) -> str:
        return f"{self.task} | {self.model.describe()} | seed {self.seed}"


def _coerce(value, hint):
    """Light type coercion for values read from files: int → float, number → str."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union and type(None) in args:  # Optional[X]
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is float and _is_int(value):
        return float(value)
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if typing.get_origin(hint) is list and isinstance(value, str):
        return [value]
    return value


def _build(cls, data, prefix: str):
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(prefix.rstrip(".") or "config", f"expected a table of settings, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise ConfigError(prefix + str(key), f"unknown setting; expected one of {sorted(names)}")
        sub = hints[name]
        if dataclasses.is_dataclass(sub):
            kwargs[name] = _build(sub, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, sub)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise _within(e, prefix) from None
    except ValueError as e:
        # Fallback for model configs that still raise a plain ValueError "<field>: <message>":
        # the field is read from the message. Remove once they all raise ConfigError.
        head, _, rest = str(e).partition(": ")
        if rest and head.isidentifier():
            raise ConfigError(prefix + head, rest) from None
        raise ConfigError(prefix.rstrip(".") or "config", str(e)) from None
    except TypeError as e:  # e.g. a missing required argument
        raise ConfigError(prefix.rstrip(".") or "config", str(e)) from None


def _within(err: ConfigError, prefix: str) -> ConfigError:
    """``err`` with its field under ``prefix`` (``"model."``), unless it names it already
    (HarmonizedConfig's fields are ``harmonized.*`` on their own)."""
    group = prefix.rstrip(".")
    if not group or err.field == group or err.field.startswith(prefix):
        return err
    return err.within(group)


def flatten(data: Mapping, prefix: str = "") -> dict:
    """``{"model": {"n_embd": 64}}`` → ``{"model.n_embd": 64}``."""
    out = {}
    for k, v in data.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def with_overrides(config: TrainConfig, overrides: Mapping[str, Any]) -> TrainConfig:
    """A copy of ``config`` with dotted-path overrides applied (``{"model.connection.streams": 1}``)
    or nested dicts; raises :class:`ConfigError` for an unknown path or invalid value."""
    data = config.to_dict()
    for path, value in flatten(overrides).items():
        node = data
        parts = path.split(".")
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                raise ConfigError(".".join(parts[: i + 1]), "unknown setting group")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(path, "unknown setting")
        node[parts[-1]] = value
    return TrainConfig.from_dict(data)
