"""What machine a measurement was made on, stored with every study and session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from paretoopt.measure.isa import int8_dot, this_machine


def hardware_fingerprint() -> dict[str, Any]:
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    isa, machine = this_machine()
    return {
        "cpu": cpu,
        # the instruction set decides which int8 kernels run, and how fast: two machines
        # with the same model name can differ here
        "isa": isa,
        "int8_dot": int8_dot(isa, machine),
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "system": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cuda": torch.version.cuda,
    }
