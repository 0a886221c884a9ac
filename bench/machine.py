"""The line every benchmark prints first: which machine the numbers were measured on."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> str:
    """CPU model, logical CPUs, load average, torch version/threads and GPU (if torch is importable)."""
    parts = [cpu_model(), f"{os.cpu_count()} logical CPUs"]
    try:
        parts.append("load avg {:.1f}".format(os.getloadavg()[0]))
    except OSError:
        pass
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads); {gpu}")
    except ImportError:
        pass
    return "; ".join(parts)
