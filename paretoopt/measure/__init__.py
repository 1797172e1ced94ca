"""Measurement: accuracy, size and latency of the deployed model on the target.

- ``protocol``: the latency protocol (warm-up, rounds, paired timing against the baseline);
- ``runtimes``: the deployed model in ONNX Runtime or eager PyTorch, and its accuracy;
- ``onnx_export``: the model as ONNX, traced once per architecture;
- ``int8``: the int8 ONNX model with calibrated activations and the plan's exact weights;
- ``fingerprint``: the machine a measurement was made on.
"""

from __future__ import annotations

from paretoopt.measure.fingerprint import hardware_fingerprint
from paretoopt.measure.onnx_export import export_onnx
from paretoopt.measure.protocol import LatencyStats, Runner, time_paired, time_runner
from paretoopt.measure.runtimes import (
    OrtRunner,
    TorchRunner,
    runtime_quality,
    runtime_threads,
    timed_call,
)

__all__ = [
    "LatencyStats",
    "OrtRunner",
    "Runner",
    "TorchRunner",
    "export_onnx",
    "hardware_fingerprint",
    "runtime_quality",
    "runtime_threads",
    "time_paired",
    "time_runner",
    "timed_call",
]
