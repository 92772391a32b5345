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
MAX_DEPTH = 100  # collections inside collections: a validator walking deeper would recurse past Python's limit


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


def depth(root: yaml.Node, limit: int) -> int:
    """How deep collections nest in `root` (a scalar: 0), counted up to `limit + 1`, iteratively."""
    deepest, seen = 0, set()
    stack = [(root, 0)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, yaml.ScalarNode) or id(node) in seen:
            continue
        seen.add(id(node))
        deepest = max(deepest, d + 1)
        if deepest > limit:
            return deepest
        stack.extend((c, d + 1) for c in _children(node))
    return deepest


def compose(text: str) -> yaml.Node | None:
    """`yaml.compose` with the checks of `check`; nesting past the parser's own recursion is a `yaml.YAMLError`."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        raise yaml.YAMLError(f"the document nests deeper than {MAX_DEPTH} levels") from None
    check(root, text)
    return root


def check(root: yaml.Node | None, text: str) -> None:
    """Raise a `yaml.YAMLError` (marked at the document's start) when `root`'s aliases expand past the bound or its
    collections nest deeper than `MAX_DEPTH`."""
    if root is None:
        return
    if depth(root, MAX_DEPTH) > MAX_DEPTH:
        raise yaml.MarkedYAMLError(problem=f"the document nests deeper than {MAX_DEPTH} levels",
                                   problem_mark=root.start_mark)
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
        try:
            root = loader.get_single_node()
        except RecursionError:
            raise yaml.YAMLError(f"the document nests deeper than {MAX_DEPTH} levels") from None
        check(root, text)
        return root, (loader.construct_document(root) if root is not None else None)
    finally:
        loader.dispose()
