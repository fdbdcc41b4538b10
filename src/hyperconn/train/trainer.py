"""The :class:`Trainer`: one training run of ``GPT(config.model)`` on ``config.task``.

    with Trainer(config) as trainer:   # process setup, run directory lock, model, optimizer
        trainer.resume()               # from the run's checkpoint, or a fresh start
        summary = trainer.fit()        # the step loop, logging, evaluation, checkpoints

:func:`hyperconn.train.train` is exactly that; the pieces are public so that a test or a
notebook can drive a run step by step (``train_step``, ``evaluate``, ``save``).

Order of one step ``s`` (0-based; the logged ``step`` is ``s + 1``, the number of optimizer
steps done): lr ← schedule(s); forward on ``train_batch(s)``; backward; every controller's
``step`` (:mod:`hyperconn.control`; it sees this forward); gradient norm, then clipping if
``grad_clip > 0``; AdamW step. A non-finite loss or gradient norm stops the run before the
update with status "diverged".

The run's progress lives in :class:`RunState` (what a checkpoint's ``progress`` restores);
the model, optimizer and controllers are attributes of the trainer. Under ``torchrun``
every rank builds the same trainer (see :mod:`.distributed`); reductions go through
``ctx`` so that every rank takes the same decisions, and rank 0 alone writes the run
directory and the console.
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..control import build_controllers
from ..models import GPT
from . import checkpoint
from .config import ConfigError, TrainConfig
from .distributed import resolve_device, setup
from .memory import check_fits
from .metrics import MetricsWriter, TensorBoardMirror, write_json
from .optim import build_optimizer, lr_at, set_lr
from .run_dir import RunLock, check_resume, prepare_out_dir, record_resume, remove_partial_writes, run_id, \
    start_fresh
from .tasks import build_task

__all__ = ["Trainer", "RunState", "StepStats", "Hook", "seed_everything"]

# hook(model, inputs, targets, loss_fn, step) -> {name: float}; called at every evaluation
# on the first held-out batch, model in eval mode with autograd enabled.
Hook = Callable[..., dict]


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's (every CUDA device's too) global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class RunState:
    """What the run has done so far; a checkpoint's ``step`` and ``progress`` restore it."""

    step: int = 0
    """optimizer steps done"""
    train_time_s: float = 0.0
    """seconds spent in training steps, over every session of the run"""
    prior_wall_s: float = 0.0
    """wall time of the run's earlier sessions (before the last resume)"""
    tokens: int = 0
    """training tokens seen (global batch)"""
    last_loss: float = float("nan")
    last_eval: dict = field(default_factory=dict)
    """the latest evaluation's metrics"""
    hook_errors: list = field(default_factory=list)
    status: str = "finished"
    """finished | diverged (a non-finite loss or gradient norm) | stopped (stop_after)"""
    diverged_step: Optional[int] = None
    resumed: bool = False

    @classmethod
    def from_checkpoint(cls, state: dict) -> "RunState":
        """The state saved in a checkpoint dict (its ``step`` and ``progress`` entries)."""
        p = dict(state.get("progress") or {})
        return cls(step=int(state["step"]), train_time_s=float(p.get("train_time_s", 0.0)),
                   prior_wall_s=float(p.get("wall_time_s", 0.0)), tokens=int(p.get("tokens", 0)),
                   last_loss=float(p.get("last_loss", float("nan"))), last_eval=dict(p.get("last_eval") or {}),
                   hook_errors=list(p.get("hook_errors") or []), resumed=True)

    def progress(self, wall_time_s: float) -> dict:
        """The checkpoint's ``progress`` entry (``wall_time_s``: the whole run's so far)."""
        return {"train_time_s": self.train_time_s, "tokens": self.tokens, "last_eval": self.last_eval,
                "last_loss": self.last_loss, "hook_errors": self.hook_errors, "wall_time_s": wall_time_s}


@dataclass
class StepStats:
    """One training step as :meth:`Trainer.train_step` saw it."""

    step: int
    """optimizer steps done once this step's update is applied (the logged step)"""
    loss: float
    """global-batch loss (mean over ranks)"""
    lr: float
    grad_norm: float
    """global gradient norm before clipping (NaN when the loss was not finite)"""
    seconds: float = 0.0


@dataclass
class _Window:
    """Sums since the last metrics line (the logged loss is their mean)."""

    loss: float = 0.0
    n: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def add(self, loss: float, tokens: int, seconds: float) -> None:
        self.loss, self.n = self.loss + loss, self.n + 1
        self.tokens, self.seconds = self.tokens + tokens, self.seconds + seconds


class _NoMetrics:
    """Stands in for the MetricsWriter on ranks other than 0."""

    def write(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


class _Progress:
    """Rich progress bar (or nothing when quiet)."""

    def __init__(self, quiet: bool, total: int, start: int, title: str):
        self.bar = None
        if quiet:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=20), MofNCompleteColumn(),
                            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                            transient=False)
        self.task = self.bar.add_task(title, total=total, completed=start, info="")
        self.bar.start()

    def update(self, step: int, info: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)

    def print(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.console.print(msg, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _fmt(v: Optional[float], spec: str = ".4f") -> str:
    return "-" if v is None or not math.isfinite(v) else format(v, spec)


def _check_tensorboard() -> None:
    """Raises ConfigError (field ``tensorboard``) without the tensorboard package."""
    try:
        import torch.utils.tensorboard  # noqa: F401 - needs the tensorboard package
    except ImportError:
        raise ConfigError("tensorboard", "needs the tensorboard package: "
                                         "pip install 'hyperconn[tensorboard]'") from None


def _default_hooks(config: TrainConfig, run_dir: Optional[Path]) -> list[Hook]:
    if not config.diagnostics:
        return []
    try:
        from ..diagnostics.probe import StabilityHook
    except ImportError:  # diagnostics not installed in this checkout: run without them
        return []
    return [StabilityHook(run_dir)]


class Trainer:
    """One run: builds everything on construction, trains with :meth:`fit`.

    Args:
        config: a validated :class:`TrainConfig`.
        hooks: extra callables ``hook(model, inputs, targets, loss_fn, step) -> dict`` run
            at every evaluation after the built-in stability hook (when
            ``config.diagnostics``); their scalars join that metrics line under
            ``diag/<name>``. A hook that raises is reported once on stderr, recorded in
            ``state.hook_errors`` and disabled for the rest of the run.

    Construction sets the torch thread count, sets up the process (:func:`.distributed.setup`),
    checks the memory estimate, seeds the RNGs, builds the task (so a bad corpus fails
    before anything exists on disk), locks the run directory (rank 0) and builds the model,
    its controllers and the optimizer. :meth:`close` (or leaving a ``with`` block) releases
    all of it. Call :meth:`resume` before :meth:`train_step` / :meth:`evaluate` /
    :meth:`save`; :meth:`fit` calls it when it has not run.

    Attributes:
        state: the :class:`RunState`.
        model: the model (DDP / FSDP2-wrapped under torchrun).
        optimizer, controllers, task, ctx, run_dir, config.
        last: the :class:`StepStats` of the latest :meth:`train_step` (None before one).

    Raises:
        TypeError: ``config`` is not a TrainConfig.
        ConfigError: invalid config for this machine (``device="cuda"`` without CUDA, under
            torchrun a ``batch_size`` that is not a multiple of the world size, a model
            that does not fit, TensorBoard without the package, an unwritable out_dir, or
            an out_dir another process holds).
    """

    def __init__(self, config: TrainConfig, hooks: Optional[Sequence[Hook]] = None):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
        self.config = config
        self._resources = contextlib.ExitStack()
        self._started = False
        self._metrics = None
        self.last: Optional[StepStats] = None
        self.state = RunState()
        self._window = _Window()
        try:
            self._set_up_process()
            self._build(list(hooks or []))
        except BaseException:
            self._resources.close()
            raise

    # ------------------------------------------------------------------ construction
    def _set_up_process(self) -> None:
        """Threads, process group, checks, seeds, task, run directory and its lock."""
        config, stack = self.config, self._resources
        stack.callback(torch.set_num_threads, torch.get_num_threads())
        if config.threads:
            torch.set_num_threads(config.threads)
        self.ctx = setup(resolve_device(config.device), config.parallel, config.batch_size)
        stack.callback(self.ctx.close)
        check_fits(config, self.ctx.device, self.ctx.world_size)  # before any allocation
        if config.tensorboard and self.ctx.is_main:
            _check_tensorboard()
        seed_everything(config.seed)
        self.task = build_task(config)
        self.run_dir = prepare_out_dir(config.out_dir)
        if self.ctx.is_main:  # one writer per run directory (see run_dir.RunLock)
            stack.enter_context(RunLock(self.run_dir))
            remove_partial_writes(self.run_dir)

    def _build(self, hooks: list) -> None:
        """Model (the same init on every rank), controllers, optimizer, hooks, eval data."""
        config, ctx, device = self.config, self.ctx, self.ctx.device
        self._wall_start = time.perf_counter()
        self.config_dict = config.to_dict()
        model = GPT(config.model).to(device)
        self.controllers = build_controllers(model, config.controller_settings())
        self._resources.callback(self._close_controllers)
        self.num_params = model.num_params()  # before FSDP shards the parameters
        self.model = ctx.wrap(model)  # DDP / FSDP2 under torchrun, else the model itself
        self.optimizer = build_optimizer(ctx.local(self.model), config.lr, config.weight_decay,
                                         (config.beta1, config.beta2), device.type)
        self.hooks = [(h, getattr(h, "__name__", type(h).__name__))
                      for h in _default_hooks(config, self.run_dir if ctx.is_main else None) + hooks]
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.tokens_per_step = config.batch_size * config.model.seq_len  # global
        # Held-out batches: each rank scores its rows; the mean over ranks is the global mean
        # (kv: P queries per sequence, bytes: every position, so every row weighs the same).
        self.eval_set = [(ctx.rows(x).to(device), ctx.rows(y).to(device)) for x, y in self.task.eval_batches()]
        self.hook_batch = tuple(t.to(device) for t in self.task.eval_batches()[0])  # full batch, every rank

    def _autocast(self):
        if self.ctx.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _close_controllers(self) -> None:
        for controller in self.controllers:
            controller.close()

    def close(self) -> None:
        """Close the metrics file, detach the controllers, release the run directory's lock
        and the process group, restore the thread count. Idempotent."""
        self._close_metrics()
        self._resources.close()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ resume
    def resume(self) -> bool:
        """Continue from the run directory's checkpoint when ``config.resume`` and one exists
        (model, optimizer, controllers, RNG states, :attr:`state`); otherwise start fresh,
        which first removes the directory's previous run. Then writes ``config.json`` and
        opens ``metrics.jsonl`` (dropping lines after the checkpoint's step).

        Returns whether it resumed.

        Raises:
            CheckpointError: the checkpoint is damaged, incompatible with this config, or
                belongs to another run (see :func:`.run_dir.check_resume`).
            RuntimeError: called twice.
        """
        if self._started:
            raise RuntimeError("Trainer.resume() already ran for this trainer")
        self._started = True
        main, run_dir = self.ctx.is_main, self.run_dir
        loaded = checkpoint.load(run_dir, self.ctx, self.config_dict, self.model, self.optimizer,
                                 self.controllers) if self.config.resume else None
        if loaded is not None:
            saved, path = loaded
            changes = check_resume(run_dir, saved, self.config_dict, path)
            self.state = RunState.from_checkpoint(saved)
            if main:
                record_resume(run_dir, self.state.step, changes)
        elif main:
            # The previous run's checkpoint, summary and diagnostics go first, so nothing
            # of it can be resumed or reported as this run's.
            start_fresh(run_dir)
        self.owner = run_id(run_dir) if main else None
        if main:
            (run_dir / "summary.json").unlink(missing_ok=True)
            write_json(run_dir / "config.json", self.config_dict)
        self._open_metrics()
        return self.state.resumed

    def _open_metrics(self) -> None:
        keep = self.state.step if self.state.resumed else None
        if not self.ctx.is_main:
            self._metrics = _NoMetrics()
            return
        self._metrics = MetricsWriter(self.run_dir / "metrics.jsonl", keep_through=keep)
        if self.config.tensorboard:
            self._metrics = TensorBoardMirror(self._metrics, self.run_dir / "tensorboard", keep)

    def _close_metrics(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

    def _require_started(self) -> None:
        if not self._started:
            raise RuntimeError("call Trainer.resume() first (it starts the run or continues it)")

    # ------------------------------------------------------------------ one step
    def train_step(self, step: int) -> float:
        """One optimizer step on ``task.train_batch(step)`` (``step`` 0-based).

        Returns the global-batch loss of this step's forward. A non-finite loss or gradient
        norm skips the update and sets ``state.status = "diverged"`` (the loss is returned,
        NaN or not); otherwise ``state.step`` becomes ``step + 1``. :attr:`last` holds the
        step's lr and gradient norm.
        """
        self._require_started()
        config, ctx, device = self.config, self.ctx, self.ctx.device
        lr = lr_at(step, config.lr, config.steps, config.warmup_steps, config.schedule, config.min_lr_ratio)
        set_lr(self.optimizer, lr)
        x, y = self.task.train_batch(step)  # the global batch; this rank trains on its rows
        x, y = ctx.rows(x).to(device, non_blocking=True), ctx.rows(y).to(device, non_blocking=True)
        t0 = time.perf_counter()
        with self._autocast():
            logits = self.model(x)
        loss = self.task.loss(logits, y)
        # Global-batch loss (mean of equal-weight rank means); a NaN anywhere is NaN
        # everywhere, so all ranks skip backward and stop together.
        loss_val = ctx.mean([float(loss.detach())])[0]
        self.optimizer.zero_grad(set_to_none=True)
        grad_norm = self._backward(loss) if math.isfinite(loss_val) else float("nan")
        self.last = StepStats(step + 1, loss_val, lr, grad_norm)
        if not (math.isfinite(loss_val) and math.isfinite(grad_norm)):
            self.state.status, self.state.diverged_step = "diverged", step + 1
            return loss_val
        if config.grad_clip > 0 and grad_norm > config.grad_clip:
            torch._foreach_mul_([p.grad for p in self.params if p.grad is not None],
                                config.grad_clip / (grad_norm + 1e-6))
        self.optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        self.last.seconds = time.perf_counter() - t0
        self._record(self.last)
        return loss_val

    def _backward(self, loss: torch.Tensor) -> float:
        """Backward, the global gradient norm, then the controllers; returns the norm."""
        loss.backward()
        grad_norm = self.ctx.grad_norm(self.params)
        for controller in self.controllers:
            # After backward: a controller may rewrite buffers this forward's graph holds.
            # It measures this forward, averaged over ranks (ctx.mean), so every rank
            # applies the same update.
            controller.step(self.ctx.mean)
        return grad_norm

    def _record(self, stats: StepStats) -> None:
        s = self.state
        s.step = stats.step
        s.train_time_s += stats.seconds
        s.tokens += self.tokens_per_step
        s.last_loss = stats.loss
        self._window.add(stats.loss, self.tokens_per_step, stats.seconds)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, step: int) -> dict:
        """Held-out metrics (``eval_loss``, the task's ``eval_accuracy`` / ``eval_bpb``; means
        over ranks) and every hook's scalars (``diag/<name>``) at ``step`` (the number of
        optimizer steps done, what the hooks are given). Leaves the model in train mode
        with no gradients."""
        self._require_started()
        model, ctx = self.model, self.ctx
        model.eval()
        sums: dict[str, float] = {}
        with torch.no_grad(), self._autocast():
            for x, y in self.eval_set:
                for k, v in self.task.score(model(x), y).items():
                    sums[k] = sums.get(k, 0.0) + v
        keys = sorted(sums)
        out = dict(zip(keys, ctx.mean([sums[k] / len(self.eval_set) for k in keys])))
        out.update(self._run_hooks(step))
        model.zero_grad(set_to_none=True)
        model.train()
        return out

    def _run_hooks(self, step: int) -> dict:
        """Every hook on the full first held-out batch; a hook that raises is disabled."""
        if not self.hooks:
            return {}
        out = {}
        x, y = self.hook_batch
        # Every rank runs the hooks on the same full batch with a plain model (see
        # Single.hook_model), so they agree; only rank 0's hook writes.
        hook_model = self.ctx.hook_model(self.model, lambda: GPT(self.config.model).to(self.ctx.device))
        for entry in list(self.hooks):
            hook, name = entry
            try:
                with torch.enable_grad():
                    scalars = hook(hook_model, x, y, self.task.loss, step)
            except Exception as e:  # noqa: BLE001 - a broken diagnostic must not end a long run
                msg = f"hook {name} failed at step {step}: {type(e).__name__}: {e}"
                self.state.hook_errors.append(msg)
                self.hooks.remove(entry)
                if self.ctx.is_main:
                    print(f"warning: {msg} (disabled for the rest of the run)", file=sys.stderr)
                continue
            for k, v in (scalars or {}).items():
                out[k if k.startswith("diag/") else f"diag/{k}"] = float(v)
        return out

    # ------------------------------------------------------------------ checkpoints
    def save(self, step: Optional[int] = None) -> None:
        """Write the checkpoint (see :func:`.checkpoint.save`: ``checkpoint.pt`` in one
        process, ``checkpoint/`` under torchrun) with the model, optimizer, controllers,
        RNG states and :attr:`state`. ``step``: the steps done, ``state.step`` by default.
        Collective under torchrun."""
        self._require_started()
        meta = {"step": self.state.step if step is None else step, "config": self.config_dict,
                "run_id": self.owner, "controllers": {c.name: c.state_dict() for c in self.controllers},
                "rng": checkpoint.rng_state(), "progress": self.state.progress(self._wall_time())}
        checkpoint.save(self.run_dir, self.ctx, self.model, self.optimizer, meta)

    def _wall_time(self) -> float:
        return self.state.prior_wall_s + time.perf_counter() - self._wall_start

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        """Train from ``state.step`` to ``config.steps`` (or ``stop_after``, or divergence),
        logging, evaluating and checkpointing on the config's cadences; writes and returns
        the summary (see :meth:`summary`). Runs :meth:`resume` first if it has not run."""
        if not self._started:
            self.resume()
        config = self.config
        bar = _Progress(config.quiet or not self.ctx.is_main, config.steps, self.state.step,
                        f"{config.task}/{config.variant}/seed{config.seed}")
        try:
            self._announce(bar)
            self._loop(bar)
        finally:
            self._close_metrics()
            bar.close()
        return self._finish()

    def _announce(self, bar: _Progress) -> None:
        ctx = self.ctx
        if self.state.resumed:
            bar.print(f"resumed {self.run_dir} at step {self.state.step}")
        where = f"{ctx.device}" if ctx.world_size == 1 else f"{ctx.world_size} x {ctx.device.type} ({ctx.parallel})"
        bar.print(f"{self.config.describe()} | {self.num_params:,} params | {where}")

    def _loop(self, bar: _Progress) -> None:
        config = self.config
        self.model.train()
        for step in range(self.state.step, config.steps):
            if config.stop_after and step >= config.stop_after:
                self.state.status = "stopped"
                return
            self.train_step(step)
            if self.state.status == "diverged":
                self._log_divergence(bar)
                return
            done = self.state.step
            self._log(done, bar)
            if done == config.steps or done == config.stop_after \
                    or (config.ckpt_every > 0 and done % config.ckpt_every == 0):
                self.save(done)

    def _log(self, done: int, bar: _Progress) -> None:
        """The metrics line of step ``done`` when one is due (with an evaluation when due)."""
        config, w = self.config, self._window
        is_eval = done == config.steps or (config.eval_every > 0 and done % config.eval_every == 0)
        if not (is_eval or done % config.log_every == 0):
            return
        row = {"step": done, "loss": w.loss / w.n, "lr": self.last.lr, "grad_norm": self.last.grad_norm,
               "tokens_per_s": w.tokens / max(w.seconds, 1e-9)}
        for controller in self.controllers:
            row.update(controller.metrics())
        if is_eval:
            self.state.last_eval = self.evaluate(done)
            row.update(self.state.last_eval)
        self._metrics.write(row)
        info = f"loss {_fmt(row['loss'])}"
        if self.task.metric in self.state.last_eval:
            info += f"  {self.task.metric[5:]} {_fmt(self.state.last_eval[self.task.metric])}"
        bar.update(done, info + f"  {row['tokens_per_s']:,.0f} tok/s")
        self._window = _Window()

    def _log_divergence(self, bar: _Progress) -> None:
        s = self.last
        self._metrics.write({"step": s.step, "loss": s.loss, "lr": s.lr, "grad_norm": s.grad_norm,
                             "diverged": True})
        bar.print(f"[red]diverged at step {s.step}: loss {s.loss}, grad norm {s.grad_norm}")

    def summary(self) -> dict:
        """The run's summary: status, steps, final metrics, sizes, timing, where it ran,
        hook errors and every controller's state under its name."""
        config, s, ctx = self.config, self.state, self.ctx
        out = {
            "status": s.status,
            "steps": s.step,
            "target_steps": config.steps,
            "diverged_step": s.diverged_step,
            "task": config.task,
            "variant": config.variant,
            "connection": config.model.connection.describe(),
            "streams": config.model.connection.streams,
            "seed": config.seed,
            "metric": self.task.metric,
            "metric_value": s.last_eval.get(self.task.metric),
            "final": {"loss": s.last_loss, **s.last_eval},
            "num_params": self.num_params,
            "tokens": s.tokens,
            "train_time_s": s.train_time_s,
            "wall_time_s": self._wall_time(),
            "tokens_per_s": s.tokens / s.train_time_s if s.train_time_s > 0 else None,
            "device": str(ctx.device),
            "world_size": ctx.world_size,
            "parallel": ctx.parallel,
            "hook_errors": s.hook_errors,
        }
        for controller in self.controllers:
            out[controller.name] = controller.state_dict()
        return out

    def _finish(self) -> dict:
        summary = self.summary()
        if self.ctx.is_main:
            write_json(self.run_dir / "summary.json", summary)
        if self.ctx.is_main and not self.config.quiet:
            metric = summary["metric_value"]
            tail = f"{self.task.metric} {_fmt(metric)}" if metric is not None else ""
            print(f"{summary['status']}: {self.run_dir} step {self.state.step}/{self.config.steps} {tail}".rstrip())
        return summary
