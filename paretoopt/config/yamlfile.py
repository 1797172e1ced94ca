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
MAX_EXPANDED = 100_000  # nodes of a stored file with its aliases expanded


class _Loader(yaml.SafeLoader):
    """The safe loader, refusing aliases, deep nesting and duplicate keys."""

    def __init__(self, stream: str, aliases: bool) -> None:
        super().__init__(stream)
        self.depth = 0
        self.aliases = aliases

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        if self.check_event(AliasEvent) and not self.aliases:
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


def load_yaml(text: str, stored: bool = False) -> Any:
    """The document in `text` as plain data (SpaceError on aliases, depth, duplicates).
    `stored`: a file paretoopt wrote (a results folder's space.yaml, a study's stored
    space). Before 2026-12 those were written with PyYAML's &id001/*id001 for a value
    used twice, so aliases are read there, as long as the expanded document stays
    under MAX_EXPANDED nodes (an alias bomb does not)."""
    loader = _Loader(text, aliases=stored)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if stored and _expanded(node, {}) > MAX_EXPANDED:
            raise SpaceError(f"its aliases expand to more than {MAX_EXPANDED} values")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded(node: Node, sizes: dict[int, int]) -> int:
    """Nodes of the document with every alias written out (counted once per node)."""
    if id(node) in sizes:
        return sizes[id(node)]
    sizes[id(node)] = MAX_EXPANDED + 1  # a cycle counts as too large
    children: list[Node] = []
    if isinstance(node.value, list):
        for item in node.value:
            children += list(item) if isinstance(item, tuple) else [item]
    size = 1 + sum(min(_expanded(c, sizes), MAX_EXPANDED + 1) for c in children)
    sizes[id(node)] = size
    return size
