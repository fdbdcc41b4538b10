"""The training loop: ``train(config, hooks=None) -> summary``.

One run writes into ``config.out_dir``::

    config.json       the resolved TrainConfig
    metrics.jsonl     one line per log step (train loss, lr, grad norm, tokens/s; eval and
                      diagnostics fields on evaluation steps)
    checkpoint.pt     model, optimizer, controller, RNG states, step (atomic writes)
    checkpoint/       instead of checkpoint.pt under torchrun: a sharded DCP checkpoint
    summary.json      status ("finished" | "diverged" | "stopped"), final metrics, timing
    diagnostics/      per-evaluation profiles written by the stability hook

Order of one step ``s`` (0-based; the logged ``step`` is ``s + 1``, the number of optimizer
steps done): lr ← schedule(s); forward on ``train_batch(s)``; backward; Harmonized
controller update (from this forward's transport); gradient norm (clip if ``grad_clip > 0``); AdamW step. A non-finite
loss or gradient norm stops the run before the update with status "diverged".

Under ``torchrun`` (``WORLD_SIZE > 1``, see :mod:`.distributed` and docs/distributed.md)
the same loop runs on every rank with DDP or FSDP2: ``batch_size`` is the global batch and
each rank trains on its rows of it; the logged loss, the gradient norm, the Harmonized
gain and the held-out metrics are reduced over ranks, so every rank takes the same
decisions (divergence, clipping, controller scale) and rank 0 alone writes the run
directory and the console.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..control import HarmonizedController
from ..models import GPT
from . import dcp
from .checkpoint import CheckpointError, load_checkpoint, read_checkpoint, rng_state, save_checkpoint
from .config import ConfigError, TrainConfig
from .distributed import setup
from .memory import check_fits
from .metrics import MetricsWriter, TensorBoardMirror, read_json, write_json
from .optim import build_optimizer, decay_split, lr_at, set_lr
from .run_dir import (RunLock, check_resume, current_digests, prepare_out_dir, record_resume,
                      remove_partial_writes, run_id, start_fresh, verify, write_checksum)
from .tasks import build_task

__all__ = ["train", "Hook", "resolve_device", "seed_everything"]

# hook(model, inputs, targets, loss_fn, step) -> {name: float}; called at every evaluation
# on the first held-out batch, model in eval mode with autograd enabled.
Hook = Callable[..., dict]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "cuda was requested but torch.cuda.is_available() is False")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _default_hooks(config: TrainConfig, run_dir: Optional[Path]) -> list[Hook]:
    if not config.diagnostics:
        return []
    try:
        from ..diagnostics.probe import StabilityHook
    except ImportError:  # diagnostics not installed in this checkout: run without them
        return []
    return [StabilityHook(run_dir)]


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


def train(config: TrainConfig, hooks: Optional[Sequence[Hook]] = None) -> dict:
    """Train ``GPT(config.model)`` on ``config.task``; returns the summary dict.

    Args:
        config: a validated :class:`TrainConfig`.
        hooks: extra callables ``hook(model, inputs, targets, loss_fn, step) -> dict``
            run at every evaluation after the built-in stability hook (when
            ``config.diagnostics``); their scalars are merged into that metrics line
            under ``diag/<name>``. A hook that raises is reported once on stderr, recorded
            in ``summary["hook_errors"]`` and disabled for the rest of the run.

    Returns normally for a diverged run (``summary["status"] == "diverged"``).

    Under torchrun every rank calls this and gets the same summary; hooks run on every
    rank (with the same full first held-out batch) and rank 0's scalars are logged.

    Raises:
        ConfigError: invalid config (e.g. ``device="cuda"`` without CUDA, or under
            torchrun a ``batch_size`` that is not a multiple of the world size).
        CheckpointError: ``resume=True`` and the checkpoint is unreadable or was
            written by a different model / task.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _train(config, list(hooks or []))
    finally:
        torch.set_num_threads(threads)


def _train(config: TrainConfig, hooks: list) -> dict:
    ctx = setup(resolve_device(config.device), config.parallel, config.batch_size)
    try:
        check_fits(config, ctx.device, ctx.world_size)  # before any allocation
        if config.tensorboard and ctx.is_main:
            try:
                import torch.utils.tensorboard  # noqa: F401 - needs the tensorboard package
            except ImportError:
                raise ConfigError("tensorboard", "needs the tensorboard package: "
                                                 "pip install 'hyperconn[tensorboard]'") from None
        seed_everything(config.seed)
        # The data first: a bad corpus fails before anything exists on disk.
        task = build_task(config)
        run_dir = prepare_out_dir(config.out_dir)
        # One writer per run directory (rank 0 writes it; see run_dir.RunLock).
        with (RunLock(run_dir) if ctx.is_main else contextlib.nullcontext()):
            if ctx.is_main:
                remove_partial_writes(run_dir)
            return _run(config, hooks, ctx, task, run_dir)
    finally:
        ctx.close()


def _run(config: TrainConfig, hooks: list, ctx, task, run_dir: Path) -> dict:
    wall_start = time.perf_counter()
    device = ctx.device
    main = ctx.is_main
    ckpt_path = run_dir / "checkpoint.pt"
    config_dict = config.to_dict()

    model = GPT(config.model).to(device)  # the same init on every rank (same seed)
    controller = None
    if any(hc.variant_name == "harmonized" for hc in model.connections()):
        h = config.harmonized
        controller = HarmonizedController(model, target_gain=h.target_gain, beta=h.beta,
                                          exponent=h.exponent, min_scale=h.min_scale)
    num_params = model.num_params()  # before FSDP shards the parameters
    model = ctx.wrap(model)  # DDP / FSDP2 under torchrun, else the model itself
    optimizer = build_optimizer(ctx.local(model), config.lr, config.weight_decay, (config.beta1, config.beta2),
                                device.type)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" \
        else contextlib.nullcontext
    all_hooks = [(h, getattr(h, "__name__", type(h).__name__)) for h in
                 _default_hooks(config, run_dir if main else None) + hooks]

    # -------------------------------------------------------------- resume
    start_step, progress_state = 0, {}
    resumed = False
    sharded_dir = dcp.find(run_dir) if config.resume else None
    if config.resume and (ckpt_path.exists() or sharded_dir is not None):
        # Checksums before anything is unpickled: a damaged file is refused by name.
        verify(run_dir, sharded_dir if sharded_dir is not None else ckpt_path)
        if sharded_dir is not None:  # saved under torchrun, by any number of ranks
            state = dcp.load_sharded(sharded_dir, config_dict, model, optimizer, controller)
        elif ctx.world_size == 1:
            state = load_checkpoint(ckpt_path, config_dict, model, optimizer, controller, map_location=device)
        else:  # a single-process checkpoint continued under torchrun
            state = read_checkpoint(ckpt_path, config_dict)
            decay, no_decay = decay_split(ctx.local(model))
            dcp.load_full_into(state, decay + no_decay, model, optimizer, controller, ckpt_path)
        changes = check_resume(run_dir, state, config_dict, sharded_dir or ckpt_path)
        start_step = int(state["step"])
        progress_state = dict(state.get("progress") or {})
        resumed = True
        if main:
            record_resume(run_dir, start_step, changes)
    elif main:
        # A fresh start: the previous run's checkpoint, summary and diagnostics go first,
        # so nothing of it can be resumed or reported as this run's.
        start_fresh(run_dir)
    owner = run_id(run_dir) if main else None
    train_time = float(progress_state.get("train_time_s", 0.0))
    prior_wall = float(progress_state.get("wall_time_s", 0.0))
    tokens_seen = int(progress_state.get("tokens", 0))
    last_eval: dict = dict(progress_state.get("last_eval") or {})
    hook_errors: list[str] = list(progress_state.get("hook_errors") or [])

    if main:
        (run_dir / "summary.json").unlink(missing_ok=True)
        write_json(run_dir / "config.json", config_dict)
    metrics = MetricsWriter(run_dir / "metrics.jsonl", keep_through=start_step if resumed else None) \
        if main else _NoMetrics()
    if main and config.tensorboard:
        metrics = TensorBoardMirror(metrics, run_dir / "tensorboard", start_step if resumed else None)
    tokens_per_step = config.batch_size * config.model.seq_len  # global
    # Held-out batches: each rank scores its rows; the mean over ranks is the global mean
    # (kv: P queries per sequence, bytes: every position, so every row weighs the same).
    eval_set = [(ctx.rows(x).to(device), ctx.rows(y).to(device)) for x, y in task.eval_batches()]
    hook_batch = tuple(t.to(device) for t in task.eval_batches()[0])  # full first batch, every rank
    params = [p for p in model.parameters() if p.requires_grad]

    bar = _Progress(config.quiet or not main, config.steps, start_step,
                    f"{config.task}/{config.variant}/seed{config.seed}")
    if resumed:
        bar.print(f"resumed {run_dir} at step {start_step}")
    where = f"{device}" if ctx.world_size == 1 else f"{ctx.world_size} x {device.type} ({ctx.parallel})"
    bar.print(f"{config.describe()} | {num_params:,} params | {where}")

    def evaluate(step: int) -> dict:
        model.eval()
        sums: dict[str, float] = {}
        with torch.no_grad(), autocast():
            for x, y in eval_set:
                for k, v in task.score(model(x), y).items():
                    sums[k] = sums.get(k, 0.0) + v
        keys = sorted(sums)
        out = dict(zip(keys, ctx.mean([sums[k] / len(eval_set) for k in keys])))
        x, y = hook_batch
        hook_model = ctx.hook_model(model, lambda: GPT(config.model).to(device)) if all_hooks else None
        for entry in list(all_hooks):
            hook, name = entry
            try:
                with torch.enable_grad():
                    # Every rank runs the hooks on the same full batch with a plain model
                    # (see Single.hook_model), so they agree; only rank 0's hook writes.
                    scalars = hook(hook_model, x, y, task.loss, step)
            except Exception as e:  # noqa: BLE001 - a broken diagnostic must not end a long run
                msg = f"hook {name} failed at step {step}: {type(e).__name__}: {e}"
                hook_errors.append(msg)
                all_hooks.remove(entry)
                if main:
                    print(f"warning: {msg} (disabled for the rest of the run)", file=sys.stderr)
                continue
            for k, v in (scalars or {}).items():
                out[k if k.startswith("diag/") else f"diag/{k}"] = float(v)
        model.zero_grad(set_to_none=True)
        model.train()
        return out

    status, diverged_step = "finished", None
    window_loss, window_n, window_tokens, window_time = 0.0, 0, 0, 0.0
    last_loss = float(progress_state.get("last_loss", float("nan")))
    done = start_step  # optimizer steps completed
    model.train()
    try:
        for step in range(start_step, config.steps):
            if config.stop_after and step >= config.stop_after:
                status = "stopped"
                break
            lr = lr_at(step, config.lr, config.steps, config.warmup_steps, config.schedule, config.min_lr_ratio)
            set_lr(optimizer, lr)
            x, y = task.train_batch(step)  # the global batch; this rank trains on its rows
            x, y = ctx.rows(x).to(device, non_blocking=True), ctx.rows(y).to(device, non_blocking=True)
            t0 = time.perf_counter()
            with autocast():
                logits = model(x)
            loss = task.loss(logits, y)
            # Global-batch loss (mean of equal-weight rank means); a NaN anywhere is NaN
            # everywhere, so all ranks skip backward and stop together.
            loss_val = ctx.mean([float(loss.detach())])[0]
            optimizer.zero_grad(set_to_none=True)
            grad_norm = float("nan")
            if math.isfinite(loss_val):
                loss.backward()
                grad_norm = ctx.grad_norm(params)
                if controller is not None:
                    # After backward: update() rewrites the scale buffer in place, and this
                    # forward's graph still holds it. The gain measured is this forward's,
                    # averaged over ranks so that every rank applies the same scale.
                    controller.update(ctx.mean([controller.measured_gain()])[0])
            if not (math.isfinite(loss_val) and math.isfinite(grad_norm)):
                status, diverged_step = "diverged", step + 1
                metrics.write({"step": step + 1, "loss": loss_val, "lr": lr, "grad_norm": grad_norm,
                               "diverged": True})
                bar.print(f"[red]diverged at step {step + 1}: loss {loss_val}, grad norm {grad_norm}")
                break
            if config.grad_clip > 0 and grad_norm > config.grad_clip:
                torch._foreach_mul_([p.grad for p in params if p.grad is not None],
                                    config.grad_clip / (grad_norm + 1e-6))
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            done = step + 1
            train_time += dt
            tokens_seen += tokens_per_step
            window_loss, window_n = window_loss + loss_val, window_n + 1
            window_tokens, window_time = window_tokens + tokens_per_step, window_time + dt
            last_loss = loss_val

            is_eval = done == config.steps or (config.eval_every > 0 and done % config.eval_every == 0)
            if is_eval or done % config.log_every == 0:
                row = {"step": done, "loss": window_loss / window_n, "lr": lr, "grad_norm": grad_norm,
                       "tokens_per_s": window_tokens / max(window_time, 1e-9)}
                if controller is not None:
                    row.update({"harmonized_scale": controller.scale,
                                "harmonized_floor_hits": controller.floor_hits,
                                "harmonized_gain": controller.last_gain})
                if is_eval:
                    last_eval = evaluate(done)
                    row.update(last_eval)
                metrics.write(row)
                info = f"loss {_fmt(row['loss'])}"
                if task.metric in last_eval:
                    info += f"  {task.metric[5:]} {_fmt(last_eval[task.metric])}"
                bar.update(done, info + f"  {row['tokens_per_s']:,.0f} tok/s")
                window_loss, window_n, window_tokens, window_time = 0.0, 0, 0, 0.0
            if done == config.steps or done == config.stop_after \
                    or (config.ckpt_every > 0 and done % config.ckpt_every == 0):
                _save(ctx, run_dir, done, config_dict, model, optimizer, controller, owner, {
                    "train_time_s": train_time, "tokens": tokens_seen, "last_eval": last_eval,
                    "last_loss": last_loss, "hook_errors": hook_errors,
                    "wall_time_s": prior_wall + time.perf_counter() - wall_start})
    finally:
        metrics.close()
        bar.close()

    summary = {
        "status": status,
        "steps": done,
        "target_steps": config.steps,
        "diverged_step": diverged_step,
        "task": config.task,
        "variant": config.variant,
        "connection": config.model.connection.describe(),
        "streams": config.model.connection.streams,
        "seed": config.seed,
        "metric": task.metric,
        "metric_value": last_eval.get(task.metric),
        "final": {"loss": last_loss, **last_eval},
        "num_params": num_params,
        "tokens": tokens_seen,
        "train_time_s": train_time,
        "wall_time_s": prior_wall + time.perf_counter() - wall_start,
        "tokens_per_s": tokens_seen / train_time if train_time > 0 else None,
        "device": str(device),
        "world_size": ctx.world_size,
        "parallel": ctx.parallel,
        "hook_errors": hook_errors,
    }
    if controller is not None:
        summary["harmonized"] = controller.state_dict()
    if main:
        write_json(run_dir / "summary.json", summary)
    if main and not config.quiet:
        tail = f"{task.metric} {_fmt(summary['metric_value'])}" if summary["metric_value"] is not None else ""
        print(f"{status}: {run_dir} step {done}/{config.steps} {tail}".rstrip())
    return summary


def _save(ctx, run_dir: Path, step, config_dict, model, optimizer, controller, owner, progress) -> None:
    """checkpoint.pt in one process; a sharded checkpoint/ directory under torchrun; both
    with their SHA-256 recorded before they are moved into place (see run_dir)."""
    meta = {"step": step, "config": config_dict, "run_id": owner,
            "controller": controller.state_dict() if controller is not None else None,
            "rng": rng_state(), "progress": progress}
    previous = current_digests(run_dir) if ctx.is_main else None
    before_replace = (lambda tmp: write_checksum(run_dir, tmp, previous)) if ctx.is_main else None
    if ctx.world_size > 1:
        dcp.save_sharded(run_dir, ctx, model, optimizer, meta, before_replace)
        return
    save_checkpoint(run_dir / "checkpoint.pt", {**meta, "model": model.state_dict(),
                                                "optimizer": optimizer.state_dict()}, before_replace)
    for name in ("checkpoint", "checkpoint.old"):  # a run continued from a sharded checkpoint
        if (run_dir / name).is_dir():
            shutil.rmtree(run_dir / name)
