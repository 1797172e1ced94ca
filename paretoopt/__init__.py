"""paretoopt: automated Pareto search over pruning, quantization and distillation.

    import paretoopt
    results = paretoopt.search("search_spaces/conv.yaml")
    results.pareto          # the feasible Pareto front as a DataFrame

The heavy parts (torch, the pipeline) are imported only when a search runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from paretoopt._version import __version__

if TYPE_CHECKING:
    from paretoopt.config.space import Space, load_space
    from paretoopt.export import export_trial, load
    from paretoopt.results.frames import StudyResults, load_results
    from paretoopt.study.search import search

__all__ = [
    "Space",
    "StudyResults",
    "__version__",
    "export_trial",
    "load",
    "load_results",
    "load_space",
    "search",
]

_LAZY = {
    "search": "study.search",
    "export_trial": "export",
    "load": "export",
    "load_results": "results.frames",
    "StudyResults": "results.frames",
    "load_space": "space",
    "Space": "space",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'paretoopt' has no attribute {name!r}")
