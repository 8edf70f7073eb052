"""YAML read under a budget: at most `MAX_BYTES` of text and `MAX_NODES` nodes once aliases
are expanded.

An alias is a pointer, so a few hundred bytes of anchors that each repeat the previous one
nine times describe billions of values ("billion laughs"). PyYAML builds them as shared
objects, cheaply, but everything after it walks the tree: validating `custom`, writing
`spec.yaml` back, flattening it for `driftlab runs`; a 368-byte spec took minutes and
gigabytes. So the document is composed into nodes first, its expanded size counted on the
node graph (each node once, in linear time), and only a document within the budget is
constructed. Real specs are a few hundred nodes and a few kilobytes.
"""

from __future__ import annotations

from typing import Any

import yaml

__all__ = ["MAX_BYTES", "MAX_NODES", "YAMLBudgetError", "bounded_load"]

#: Largest YAML text read (spec files, sweep files, a run's stored spec.yaml).
MAX_BYTES = 1 << 20
#: Most nodes a document may hold with its aliases expanded.
MAX_NODES = 100_000


class YAMLBudgetError(yaml.YAMLError):
    """The text is over the byte budget or expands to more nodes than the node budget."""


def bounded_load(text: str | bytes, loader: type[Any]) -> Any:
    """`yaml.load(text, Loader=loader)`, refusing text or expansions over the budget."""
    if len(text) > MAX_BYTES:
        raise YAMLBudgetError(
            f"is {len(text):,} bytes, over the {MAX_BYTES:,}-byte limit for YAML it reads"
        )
    reader = loader(text)
    try:
        node = reader.get_single_node()
        if node is None:
            return None
        nodes = expanded_size(node, MAX_NODES)
        if nodes > MAX_NODES:
            raise YAMLBudgetError(
                f"its anchors and aliases expand to over {MAX_NODES:,} values (an alias "
                "bomb?): write the values out, or use fewer aliases"
            )
        return reader.construct_document(node)
    finally:
        reader.dispose()


def expanded_size(root: yaml.Node, limit: int) -> int:
    """Nodes of the tree `root` stands for, every alias expanded; counting stops past `limit`.

    Each distinct node is visited once (its subtree size is remembered), so a document
    whose aliases expand exponentially is measured in time linear in its text.
    """
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        known = sizes.get(id(node))
        if known is not None:
            return known
        sizes[id(node)] = limit + 1  # a node reached again while being counted: a cycle
        total = 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        else:
            children = []
        for child in children:
            total = min(total + size(child), limit + 1)
        sizes[id(node)] = total
        return total

    return size(root)
