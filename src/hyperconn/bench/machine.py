"""What the numbers were measured on: CPU, cores, torch, device, load average."""

from __future__ import annotations

import os
import platform
from typing import Optional

import torch

__all__ = ["machine_info", "loadavg"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> Optional[list[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_info(device: torch.device) -> dict:
    """What the numbers were measured on (recorded in every report)."""
    info = {
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "load_avg_start": loadavg(),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        from importlib.metadata import version
        info["hyper_connections"] = version("hyper-connections")
    except Exception:
        info["hyper_connections"] = None
    return info
