"""Where and how a study trains: the device (``baseline.device``, ``space.finetune.device``),
mixed precision, and the user's hooks of the ``recipe`` section (loss, optimizer, weight
decay, gradient clipping). Baseline training and every trial's fine-tuning share them.

Devices are independent of the measurement target: a study can train on a GPU and time
its candidates on the CPU (or on a remote agent). Hooks are imported and tried once on a
tiny input when the study starts, so a broken one fails there in one line, never in the
middle of a trial.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from paretoopt.config.space import DEVICE_RE
from paretoopt.errors import SpaceError, one_line
from paretoopt.workload.registry import load_callable

# (logits, labels) -> a scalar loss tensor
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (parameters, learning rate) -> an optimizer
OptimizerFactory = Callable[[Iterable[nn.Parameter], float], torch.optim.Optimizer]


@dataclass(frozen=True)
class Setup:
    """How every training run of a study goes, apart from its epochs and learning rate."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp: bool = True  # mixed precision, on CUDA only (bfloat16 where the GPU has it)
    loss: LossFn | None = None  # None: cross-entropy
    optimizer: OptimizerFactory | None = None  # None: Adam (AdamW with weight decay)
    weight_decay: float = 0.0
    grad_clip: float | None = None  # largest gradient norm; None: not clipped

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The autocast type, or None where training runs in float32."""
        if not (self.amp and self.cuda):
            return None
        # bfloat16 natively from compute capability 8 (Ampere); is_bf16_supported() also
        # says yes to older GPUs that only emulate it, slowly
        native = torch.cuda.get_device_properties(self.device).major >= 8
        return torch.bfloat16 if native else torch.float16

    def autocast(self) -> Any:
        dtype = self.amp_dtype
        if dtype is None:
            return nullcontext()
        return torch.autocast(device_type="cuda", dtype=dtype)

    def scaler(self) -> torch.amp.GradScaler | None:
        """float16 needs its gradients scaled (bfloat16 has float32's range)."""
        return torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None

    def make_optimizer(self, params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        params = list(params)
        if self.optimizer is not None:
            return self.optimizer(params, lr)
        if self.weight_decay > 0:  # decoupled, as weight decay with Adam should be
            return torch.optim.AdamW(params, lr=lr, weight_decay=self.weight_decay)
        return torch.optim.Adam(params, lr=lr)

    def criterion(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.loss is None:
            return F.cross_entropy(logits, labels)
        return self.loss(logits, labels)


def resolve_device(name: str, where: str) -> torch.device:
    """`auto`: the current CUDA device where there is one, else the CPU. An explicit CUDA
    device that this machine lacks is an error, not a silent fall-back."""
    if not DEVICE_RE.match(name):  # the space file checked it; a caller's own value too
        raise SpaceError(f"{where}: {name!r} is not a device; choose from auto, cpu, cuda, cuda:N")
    if name == "auto":
        return torch.device("cuda", _default_gpu()) if _has_cuda() else cpu()
    if name == "cpu":
        return cpu()
    if not _has_cuda():
        raise SpaceError(f"{where}: {name}, but this machine has no usable CUDA device")
    index = int(name.split(":")[1]) if ":" in name else _default_gpu()
    count = torch.cuda.device_count()
    if index >= count:
        raise SpaceError(
            f"{where}: {name}, but this machine has {count} CUDA device(s): cuda:0 to "
            f"cuda:{count - 1}"
        )
    return torch.device("cuda", index)


def cpu() -> torch.device:
    return torch.device("cpu")


def _has_cuda() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


_WORKER_GPU: int | None = None  # set in a worker process by pin_worker_gpu


def _default_gpu() -> int:
    """The GPU `auto` and `cuda` train on: the worker's own, else the current one."""
    return torch.cuda.current_device() if _WORKER_GPU is None else _WORKER_GPU


def pin_worker_gpu(index: int) -> int | None:
    """`search --workers N` on a machine with several GPUs: worker `index` (0 = the main
    process) trains on GPU index % count where a setting says `auto` or `cuda` (`cuda:N`
    stays N). Only training moves: the current device, which a CUDA latency target times
    on, stays the same for every worker. Returns the GPU, or None with fewer than two."""
    global _WORKER_GPU
    if not _has_cuda() or torch.cuda.device_count() < 2:
        return None
    _WORKER_GPU = index % torch.cuda.device_count()
    return _WORKER_GPU


# --------------------------------------------------------------------------- user hooks


def load_setup(recipe: Any, device: str, where: str, classes: int = 3) -> Setup:
    """The Setup a space file's recipe section and a device setting name; the hooks are
    imported and tried on a tiny input on that device, with the model's number of logits
    (`classes`) (SpaceError naming the YAML path on any fault)."""
    on = resolve_device(device, where)
    loss = load_loss(recipe.loss, classes=classes, device=on) if recipe.loss else None
    optimizer = load_optimizer(recipe.optimizer) if recipe.optimizer else None
    return Setup(
        device=on,
        amp=recipe.amp,
        loss=loss,
        optimizer=optimizer,
        weight_decay=recipe.weight_decay,
        grad_clip=recipe.grad_clip,
    )


def load_loss(
    ref: str, where: str = "recipe.loss", classes: int = 3, device: torch.device | None = None
) -> LossFn:
    fn = load_callable(ref, where)
    _takes(fn, 2, where, "(logits, labels)")
    device = device or cpu()
    logits = torch.randn(4, classes, device=device, requires_grad=True)
    labels = torch.arange(4, device=device) % classes
    try:
        out = fn(logits, labels)
    except Exception as exc:
        raise SpaceError(
            f"{where}: calling it with logits (4, {classes}) and labels (4,) on {device} "
            f"failed: {type(exc).__name__}: {one_line(str(exc))[:200]}"
        ) from None
    if not isinstance(out, torch.Tensor) or out.dim() != 0:
        got = f"shape {list(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise SpaceError(f"{where}: must return a scalar tensor, but returned {got}")
    if not out.requires_grad:
        raise SpaceError(
            f"{where}: returned a tensor that gradients do not flow through (computed with "
            ".item(), numpy or under torch.no_grad?)"
        )
    return fn


def load_optimizer(ref: str, where: str = "recipe.optimizer") -> OptimizerFactory:
    fn = load_callable(ref, where)
    _takes(fn, 2, where, "(params, lr)")
    try:
        out = fn([nn.Parameter(torch.zeros(2))], 1e-3)
    except Exception as exc:
        raise SpaceError(
            f"{where}: calling it with (params, lr=0.001) failed: {type(exc).__name__}: "
            f"{one_line(str(exc))[:200]}"
        ) from None
    if not isinstance(out, torch.optim.Optimizer):
        raise SpaceError(
            f"{where}: must return a torch.optim.Optimizer, but returned {type(out).__name__}"
        )
    return fn


def _takes(fn: Callable[..., Any], n: int, where: str, shape: str) -> None:
    """The hook accepts `n` positional arguments (a class or a lambda alike)."""
    try:
        inspect.signature(fn).bind(*range(n))
    except TypeError:
        raise SpaceError(f"{where}: must take {n} arguments {shape}") from None
    except ValueError:  # a builtin without a signature: the trial call decides
        return


@contextmanager
def on_device(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """The model on `device` for a block, back where it was afterwards (also on error)."""
    home = next((p.device for p in model.parameters()), cpu())
    if home == device:
        yield model
        return
    model.to(device)
    try:
        yield model
    finally:
        model.to(home)
