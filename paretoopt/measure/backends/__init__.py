"""Runtimes a study measures in: one module each, behind the protocol in ``base``.

- ``onnxruntime``: an ONNX file, float or int8 QDQ, on the CPU (the default);
- ``torch_eager``: the rebuilt module in eager PyTorch on the CPU;
- ``cuda``: the rebuilt module in PyTorch on a CUDA device;
- ``openvino_ir``: an OpenVINO IR (``.xml``/``.bin``), float or int8, on the CPU;
- ``executorch_pte``: an ExecuTorch program (``.pte``) delegated to XNNPACK, float or int8.

The last two are optional extras (``pip install -e '.[openvino]'``, ``'.[executorch]'``).

``create_backend`` picks one for a target and imports only that one. A new runtime is a
module with a class that has ``from_spec`` and the protocol's methods, and one entry in
``BACKENDS``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from paretoopt.measure.backends.base import Backend, Deployment, DeployRequest

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


__all__ = ["BACKENDS", "Backend", "DeployRequest", "Deployment", "backend_name", "create_backend"]
