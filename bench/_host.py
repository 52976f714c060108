"""What every benchmark records about the machine it ran on (results are only comparable
between runs on the same host, so each JSON names it)."""
from __future__ import annotations

import os
import platform
import socket
from pathlib import Path
from typing import Any

import torch


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_info(**extra: Any) -> dict[str, Any]:
    """Host name, CPU, core count and library versions, plus `extra` (threads, notes, ...)."""
    info: dict[str, Any] = {"hostname": socket.gethostname(), "cpu": cpu_name(), "cores": os.cpu_count(),
                            "torch": torch.__version__}
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    info.update(extra)
    return info
