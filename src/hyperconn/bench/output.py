"""A benchmark report's header (:func:`meta`) and its file (:func:`write_report`)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import shlex
from pathlib import Path
from typing import Sequence

import torch

from .._io import atomic_write_text, nan_to_none
from .machine import machine_info
from .render import render_markdown

__all__ = ["command_line", "meta", "write_report"]


def command_line(argv: Sequence[str]) -> str:
    return "hyperconn bench " + " ".join(shlex.quote(a) for a in argv)


def meta(argv: Sequence[str], device: torch.device, settings: dict) -> dict:
    return {"command": command_line(argv),
            "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": machine_info(device), "settings": settings}


def write_report(report: dict, path: os.PathLike) -> Path:
    """Write the report as JSON (``.json``, NaN/inf as ``null``) or markdown (anything
    else), atomically; returns the path.

    Raises:
        OSError: if the file cannot be written (the old one, if any, is left intact).
    """
    path = Path(path)
    text = (json.dumps(nan_to_none(report), indent=2, allow_nan=False) + "\n"
            if path.suffix.lower() == ".json" else render_markdown(report))
    return atomic_write_text(path, text)
