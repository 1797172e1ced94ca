"""The quality objective: what the space file's ``metric:`` measures on a split's logits.

Built-in metrics (``config/metrics.QUALITY``) are counted a batch at a time in integers
(correct predictions, a confusion matrix), so a split of any length is scored in constant
memory and the runtime's figure equals PyTorch's exactly where their predictions agree.
A user metric, ``module:callable``, receives the whole split at once, as numpy arrays:
logits (N, C) float32 and labels (N,) int64; it returns a number, higher is better, in
its own units (``data.eval_samples`` bounds N). It is tried once on a tiny input when
the study starts, so a broken one fails there in one line.

No torch: the scores are numpy arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import numpy as np

from paretoopt.config.metrics import QUALITY, is_user_quality
from paretoopt.errors import SpaceError, TrialError, one_line
from paretoopt.workload.registry import load_callable

UserMetric = Callable[[np.ndarray, np.ndarray], Any]


class Scorer(Protocol):
    def update(self, logits: np.ndarray, labels: np.ndarray) -> None: ...

    def result(self) -> float: ...


class TopK:
    """Percent of samples whose label is among the k highest logits."""

    def __init__(self, k: int) -> None:
        self.k, self.correct, self.total = k, 0, 0

    def update(self, logits: np.ndarray, labels: np.ndarray) -> None:
        if self.k == 1:
            hit = logits.argmax(axis=1) == labels
        else:
            # the label's rank: classes scored higher, and tied ones of a higher index
            # (scikit-learn's top_k_accuracy_score breaks ties that way)
            own = logits[np.arange(len(labels)), labels][:, None]
            later = np.arange(logits.shape[1])[None, :] > labels[:, None]
            rank = (logits > own).sum(axis=1) + ((logits == own) & later).sum(axis=1)
            hit = rank < self.k
        self.correct += int(hit.sum())
        self.total += len(labels)

    def result(self) -> float:
        return self.correct * 100.0 / self.total


class Confusion:
    """A confusion matrix, grown as classes appear; macro F1 or balanced accuracy in
    percent, as scikit-learn defines them (F1 over the classes in the labels or the
    predictions, recall over the classes in the labels; an empty class scores 0)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.matrix = np.zeros((0, 0), dtype=np.int64)

    def update(self, logits: np.ndarray, labels: np.ndarray) -> None:
        predicted = logits.argmax(axis=1)
        n = max(len(self.matrix), logits.shape[1], int(labels.max()) + 1)
        if n > len(self.matrix):
            grown = np.zeros((n, n), dtype=np.int64)
            grown[: len(self.matrix), : len(self.matrix)] = self.matrix
            self.matrix = grown
        np.add.at(self.matrix, (labels, predicted), 1)

    def result(self) -> float:
        m = self.matrix
        tp = np.diag(m).astype(np.float64)
        actual, predicted = m.sum(axis=1), m.sum(axis=0)
        if self.kind == "balanced_accuracy":
            present = actual > 0
            return float((tp[present] / actual[present]).mean() * 100.0)
        present = (actual + predicted) > 0
        f1 = 2 * tp[present] / (actual[present] + predicted[present])
        return float(f1.mean() * 100.0)


class UserScore:
    """The user's callable over the whole split (batches are concatenated first)."""

    def __init__(self, fn: UserMetric, name: str) -> None:
        self.fn, self.name = fn, name
        self.logits: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []

    def update(self, logits: np.ndarray, labels: np.ndarray) -> None:
        self.logits.append(np.asarray(logits, dtype=np.float32))
        self.labels.append(np.asarray(labels, dtype=np.int64))

    def result(self) -> float:
        logits, labels = np.concatenate(self.logits), np.concatenate(self.labels)
        try:
            value = self.fn(logits, labels)
        except Exception as exc:
            raise TrialError(
                f"metric {self.name}: failed on {len(labels)} samples: "
                f"{type(exc).__name__}: {one_line(str(exc))[:200]}"
            ) from None
        return _number(value, f"metric {self.name}", TrialError)


def _number(value: Any, where: str, error: type[Exception]) -> float:
    """A finite real number from what a user metric returned (a 0-d array or tensor too)."""
    try:
        number = float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        raise error(f"{where}: must return a number, but returned {type(value).__name__}") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise error(f"{where}: must return a finite number, but returned {value!r}")
    return number


class Quality:
    """The study's quality metric: a name, and a fresh scorer for each split."""

    def __init__(self, name: str = "top1", fn: UserMetric | None = None) -> None:
        self.name, self.fn = name, fn

    def scorer(self) -> Scorer:
        if self.fn is not None:
            return UserScore(self.fn, self.name)
        if self.name in ("top1", "top5"):
            return TopK(int(self.name[3:]))
        return Confusion(self.name)

    def score(self, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
        """The metric over (logits, labels) batches."""
        scorer = self.scorer()
        for logits, labels in batches:
            scorer.update(logits, labels)
        return scorer.result()


TOP1 = Quality()


def load_quality(name: str, where: str = "metric", classes: int = 3) -> Quality:
    """The Quality a space file's ``metric`` names; a user callable is imported and tried
    on a tiny input of the model's width `classes`, every class present (SpaceError
    naming the YAML path on any fault)."""
    if not is_user_quality(name):
        if name not in QUALITY:  # the space file checked it: a caller's own value
            raise SpaceError(f"{where}: unknown metric {name!r}; choose from {', '.join(QUALITY)}")
        return Quality(name)
    fn = load_callable(name, where)
    n = max(8, 2 * classes)
    logits = np.random.default_rng(0).standard_normal((n, classes)).astype(np.float32)
    labels = np.arange(n, dtype=np.int64) % classes
    try:
        value = fn(logits, labels)
    except Exception as exc:
        raise SpaceError(
            f"{where}: calling it with logits ({n}, {classes}) float32 and labels ({n},) "
            f"int64 failed: {type(exc).__name__}: {one_line(str(exc))[:200]}"
        ) from None
    _number(value, where, SpaceError)
    return Quality(name, fn)
