"""Bounded, strict YAML reading for scenario files and overrides.

PyYAML's ``safe_load`` accepts duplicate keys (the last one silently wins), expands
aliases without limit (a "billion laughs" document of a few hundred bytes becomes 10^9
values and hangs whatever walks it), recurses without limit on nesting, and parses
integers of any length. Scenario files are small hand-written documents, so each of these
is bounded here and reported as :class:`YAMLInputError` with the line it was found on:

- a document is at most :data:`MAX_BYTES` bytes;
- mappings must not repeat a key (merge keys ``<<`` may still be overridden);
- anchors and aliases are allowed, but the document they expand to has at most
  :data:`MAX_VALUES` values and no cycles;
- nesting (after alias expansion) is at most :data:`MAX_DEPTH` levels;
- an integer has at most :data:`MAX_INT_DIGITS` digits (seeds fit in 64 bits: 20 digits).

This module must not import :mod:`fedsim.config` (which imports it).
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_BYTES = 1_000_000
MAX_DEPTH = 32
MAX_VALUES = 100_000
MAX_INT_DIGITS = 40


class YAMLInputError(ValueError):
    """A document that breaks one of the bounds or rules above; the message is one line."""


def _line(node_or_mark: Any) -> str:
    mark = getattr(node_or_mark, "start_mark", node_or_mark)
    return f"line {mark.line + 1}" if mark is not None else "(unknown line)"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that counts nesting while composing and refuses duplicate keys and
    over-long integers while constructing."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        # The composer recurses per level: stop before Python's recursion limit does.
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise YAMLInputError(f"{_line(self.peek_event())}: nesting deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` then a key: overriding the merged value is intended
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # unhashable key: PyYAML reports it below
                    continue
                if first is not None:
                    raise YAMLInputError(
                        f"{_line(key_node)}: duplicate key '{_short(key)}' (first given on line {first})"
                    )
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node: Any) -> int:
        digits = len(str(node.value).replace("_", "").lstrip("+-"))  # hex/octal/binary too
        if digits > MAX_INT_DIGITS:
            raise YAMLInputError(f"{_line(node)}: integer of {digits} digits (at most {MAX_INT_DIGITS})")
        return super().construct_yaml_int(node)


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)


def _short(value: Any, limit: int = 60) -> str:
    text = str(value).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_expansion(root: Any) -> None:
    """Count the values the node graph expands to (aliases repeat their anchor's subtree)
    and its expanded depth, in time linear in the graph, refusing cycles."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    on_path: set[int] = set()

    def visit(node: Any, level: int) -> None:
        key = id(node)
        if key in size:
            return
        if key in on_path:
            raise YAMLInputError(f"{_line(node)}: an alias refers to a value that contains it (recursive alias)")
        if level > MAX_DEPTH:
            raise YAMLInputError(f"{_line(node)}: nesting deeper than {MAX_DEPTH} levels (after expanding aliases)")
        on_path.add(key)
        children: list[Any] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        total, deepest = 1, 0
        for child in children:
            visit(child, level + 1)
            total += size[id(child)]
            deepest = max(deepest, depth[id(child)])
            if total > MAX_VALUES:
                raise YAMLInputError(
                    f"{_line(node)}: the document expands to more than {MAX_VALUES} values (anchors and aliases)"
                )
            if level + deepest > MAX_DEPTH:
                raise YAMLInputError(f"{_line(node)}: nesting deeper than {MAX_DEPTH} levels (after expanding aliases)")
        on_path.discard(key)
        size[key], depth[key] = total, deepest + 1

    visit(root, 1)


def load(text: str) -> Any:
    """Parse one YAML document under the bounds above. Raises :class:`YAMLInputError`
    for a broken bound or rule, ``yaml.YAMLError`` for a syntax error."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise YAMLInputError(f"larger than {MAX_BYTES // 1_000_000} MB; a scenario is a small text file")
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return loader.construct_document(node)
    except RecursionError:  # a bound above should come first; never let it escape
        raise YAMLInputError(f"nesting deeper than {MAX_DEPTH} levels") from None
    finally:
        loader.dispose()


__all__ = ["MAX_BYTES", "MAX_DEPTH", "MAX_INT_DIGITS", "MAX_VALUES", "YAMLInputError", "load"]
