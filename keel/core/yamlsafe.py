"""YAML from callers, with what its aliases expand to bounded: a few hundred bytes of anchors and aliases
("billion laughs") make a tree of billions of nodes once a validator or serializer walks the data, and an alias
inside its own anchor makes one without end. A document without aliases is never refused (each node takes at
least a character), so the bound is linear in the text.

    >>> root, data = load("a: &x [1, 2]\\nb: *x\\n")
    >>> data
    {'a': [1, 2], 'b': [1, 2]}
"""

from __future__ import annotations

from typing import Any

import yaml

MIN_NODES = 10_000  # expanded nodes always allowed, whatever the text's length


def expanded_nodes(root: yaml.Node, limit: int) -> int:
    """How many nodes `root` holds with every alias expanded, counted without expanding (each node once); past
    `limit`, or for a node that contains itself, `limit + 1`."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()  # the nodes on the path being counted: meeting one again is a cycle
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        children = _children(node)
        if done:
            open_.discard(id(node))
            sizes[id(node)] = min(limit + 1, 1 + sum(sizes[id(c)] for c in children))
            continue
        if id(node) in sizes:
            continue
        if id(node) in open_:
            return limit + 1
        open_.add(id(node))
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def check(root: yaml.Node | None, text: str) -> None:
    """Raise a `yaml.YAMLError` (marked at the document's start) when `root`'s aliases expand past the bound."""
    if root is None:
        return
    limit = max(MIN_NODES, len(text))
    if expanded_nodes(root, limit) > limit:
        raise yaml.MarkedYAMLError(problem=f"its aliases expand to over {limit} nodes (or an alias contains "
                                           "itself); write the values out instead of aliasing them",
                                   problem_mark=root.start_mark)


def load(text: str) -> tuple[yaml.Node | None, Any]:
    """The composed node tree (for line numbers) and the plain data, from one safe parse; `yaml.YAMLError` for
    text that is not YAML or whose aliases expand past the bound."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        check(root, text)
        return root, (loader.construct_document(root) if root is not None else None)
    finally:
        loader.dispose()
