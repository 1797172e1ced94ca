"""Runtimes a study measures in: one module each, behind the protocol in ``base``.

- ``onnxruntime``: an ONNX file, float or int8 QDQ, on the CPU (the default);
- ``torch_eager``: the rebuilt module in eager PyTorch on the CPU;
- ``cuda``: the rebuilt module in PyTorch on a CUDA device;
- ``openvino_ir``: an OpenVINO IR (``.xml``/``.bin``), float or int8, on the CPU;
- ``executorch_pte``: an ExecuTorch program (``.pte``) delegated to XNNPACK, float or int8.

The last two are optional extras (``pip install -e '.[openvino]'``, ``'.[executorch]'``).

``create_backend`` picks one for a target and imports only that one. A new runtime is a
module with a class that has ``from_spec`` and the protocol's methods, and one entry in
``BACKENDS``; a runtime a remote agent can serve has a format class too (``Served``),
with its entry in ``FORMATS``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from paretoopt.measure.backends.base import (
    OPTIONAL,
    Backend,
    Deployment,
    DeployRequest,
    Served,
)

if TYPE_CHECKING:
    from paretoopt.config.space import TargetSpec
    from paretoopt.workload.inputs import Inputs

# backend name -> (module in this package, class); the name is what records say ran
BACKENDS = {
    "onnxruntime": ("onnxruntime", "OnnxRuntimeBackend"),
    "torch": ("torch_eager", "TorchBackend"),
    "torch-cuda": ("cuda", "CudaBackend"),
    "openvino": ("openvino_ir", "OpenVinoBackend"),  # optional: the openvino extra
    "executorch": ("executorch_pte", "ExecuTorchBackend"),  # optional: the executorch extra
}


# runtime -> (module, class) of the format an agent takes its files in
FORMATS = {
    "onnxruntime": ("onnxruntime", "OnnxFormat"),
    "openvino": ("openvino_ir", "IrFormat"),
    "executorch": ("executorch_pte", "PteFormat"),
}


def served(runtime: str) -> Served:
    """The format a runtime's files travel to an agent in (KeyError: none is served)."""
    module, cls = FORMATS[runtime]
    fmt: Served = getattr(importlib.import_module(f".{module}", __name__), cls)()
    return fmt


def installed_formats() -> dict[str, Served]:
    """The formats an agent on this machine can serve: those whose runtime is installed."""
    import importlib.util

    def here(runtime: str) -> bool:
        return runtime not in OPTIONAL or importlib.util.find_spec(OPTIONAL[runtime][0]) is not None

    return {runtime: served(runtime) for runtime in FORMATS if here(runtime)}


def backend_name(spec: TargetSpec) -> str:
    """The backend a target section asks for (`device: cuda` runs PyTorch on the GPU)."""
    return "torch-cuda" if spec.device == "cuda" else spec.runtime


def create_backend(spec: TargetSpec, example: Inputs) -> Backend:
    """The target's backend; `example` is one input, for export."""
    module, cls = BACKENDS[backend_name(spec)]
    backend: Backend = getattr(importlib.import_module(f".{module}", __name__), cls).from_spec(
        spec, example
    )
    return backend


__all__ = [
    "BACKENDS",
    "FORMATS",
    "Backend",
    "DeployRequest",
    "Deployment",
    "Served",
    "backend_name",
    "create_backend",
    "installed_formats",
    "served",
]
