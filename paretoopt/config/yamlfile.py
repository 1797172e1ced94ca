"""Reading a YAML document that a user wrote: plain data, bounded.

``yaml.safe_load`` constructs no objects, but it accepts what a space file has no use
for and what makes every later step unbounded: aliases (``*name``: an alias bomb in
``model.kwargs`` made the error message grow at 40 MB/s), nesting thousands deep (a
``RecursionError`` traceback) and duplicate keys (the last one silently won). Each is
refused here with one line naming where it is in the file.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node

from paretoopt.errors import SpaceError, shown

MAX_DEPTH = 32  # nested mappings and lists; a space file needs 4


class _Loader(yaml.SafeLoader):
    """The safe loader, refusing aliases, deep nesting and duplicate keys."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        if self.check_event(AliasEvent):
            raise SpaceError(f"{_at(self.peek_event())}: YAML aliases (*name) are not accepted")
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise SpaceError(
                    f"{_at(self.peek_event())}: nested more than {MAX_DEPTH} levels deep"
                )
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise SpaceError(f"{_at(key_node)}: duplicate key {shown(key)}")
                seen.add(key)
        return super().construct_mapping(node, deep)


def _at(item: Any) -> str:
    mark = item.start_mark
    return f"line {mark.line + 1}, column {mark.column + 1}"


def load_yaml(text: str) -> Any:
    """The document in `text` as plain data (SpaceError on aliases, depth, duplicates)."""
    loader = _Loader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
