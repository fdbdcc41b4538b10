"""Experiments: comparison presets (as data) and the runner behind ``hyperconn compare``."""

from .compare import run_compare, summarize
from .presets import PRESETS, Job, Preset, RunGroup, expand, get_preset

__all__ = ["PRESETS", "Preset", "RunGroup", "Job", "expand", "get_preset", "run_compare", "summarize"]
