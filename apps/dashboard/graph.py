"""Layered layout of a task graph for the task page's SVG drawing.

Pure functions, no database: `layers` puts each node at the length of the longest
dependency path that reaches it from a source (a node with no dependencies), `layout`
orders each layer to cut crossings (a barycenter sweep) and gives every node and edge its
coordinates."""

from collections import defaultdict, deque
from dataclasses import dataclass, field

NODE_W = 168
NODE_H = 40
GAP_X = 56
GAP_Y = 16
PAD = 8


def layers(nodes: list[int], edges: list[tuple[int, int]]) -> dict[int, int]:
    """Layer of each node: the longest path from a source along `edges` (src before dst).
    Edges naming unknown nodes are ignored; nodes on a cycle (which the services never
    allow) are put after everything else rather than looping."""
    known = set(nodes)
    succ: dict[int, list[int]] = defaultdict(list)
    indegree = dict.fromkeys(nodes, 0)
    for src, dst in set(edges):
        if src in known and dst in known and src != dst:
            succ[src].append(dst)
            indegree[dst] += 1
    layer = dict.fromkeys(nodes, 0)
    queue = deque(sorted(n for n in nodes if indegree[n] == 0))
    done = 0
    while queue:
        node = queue.popleft()
        done += 1
        for nxt in succ[node]:
            layer[nxt] = max(layer[nxt], layer[node] + 1)
            indegree[nxt] -= 1
            if indegree[nxt] == 0:
                queue.append(nxt)
    if done < len(nodes):
        top = max(layer.values(), default=0) + 1
        for node in nodes:
            if indegree[node] > 0:
                layer[node] = top
    return layer


@dataclass
class Node:
    id: int
    title: str
    status: str
    layer: int = 0
    x: int = 0
    y: int = 0
    current: bool = False
    url: str = ""
    w: int = NODE_W
    h: int = NODE_H

    @property
    def label(self) -> str:
        text = f"#{self.id} {self.title}"
        return text if len(text) <= 24 else text[:23] + "…"


@dataclass
class Edge:
    src: int
    dst: int
    kind: str  # "dependency" (src must succeed first) or "parent" (src decomposed into dst)
    path: str = ""


@dataclass
class Layout:
    nodes: list[Node]
    edges: list[Edge]
    width: int
    height: int
    depth: int = 0
    extra: dict = field(default_factory=dict)


def layout(nodes: list[Node], edges: list[Edge]) -> Layout:
    """Coordinates for a left-to-right layered drawing. Layers come from the dependency
    edges only: a parent may well depend on its own sub-tasks, so decomposition edges are
    drawn but do not order the layers."""
    by_id = {node.id: node for node in nodes}
    edges = [e for e in edges if e.src in by_id and e.dst in by_id and e.src != e.dst]
    layer_of = layers(
        [n.id for n in nodes], [(e.src, e.dst) for e in edges if e.kind == "dependency"]
    )
    columns: dict[int, list[Node]] = defaultdict(list)
    for node in sorted(nodes, key=lambda n: n.id):
        node.layer = layer_of[node.id]
        columns[node.layer].append(node)
    # One barycenter sweep left to right: each node sits near the nodes that point at it.
    preds: dict[int, list[int]] = defaultdict(list)
    for edge in edges:
        preds[edge.dst].append(edge.src)
    position: dict[int, float] = {}
    for index in sorted(columns):
        column = columns[index]

        def weight(node: Node) -> tuple[float, int]:
            placed = [position[p] for p in preds[node.id] if p in position]
            return (sum(placed) / len(placed) if placed else float("inf"), node.id)

        if index:
            column.sort(key=weight)
        for row, node in enumerate(column):
            position[node.id] = row
            node.x = PAD + index * (NODE_W + GAP_X)
            node.y = PAD + row * (NODE_H + GAP_Y)
    for edge in edges:
        a, b = by_id[edge.src], by_id[edge.dst]
        if edge.kind == "dependency" or a.layer < b.layer:
            x1, y1 = a.x + a.w, a.y + a.h // 2
            x2, y2 = b.x, b.y + b.h // 2
        else:  # same layer or backwards: bottom to top, so the curve stays visible
            x1, y1 = a.x + a.w // 2, a.y + a.h
            x2, y2 = b.x + b.w // 2, b.y
        bend = max(abs(x2 - x1) // 2, 24)
        if x1 <= x2:
            edge.path = f"M{x1},{y1} C{x1 + bend},{y1} {x2 - bend},{y2} {x2},{y2}"
        else:
            edge.path = f"M{x1},{y1} C{x1},{y1 + 30} {x2},{y2 - 30} {x2},{y2}"
    depth = max(columns, default=0)
    tallest = max((len(c) for c in columns.values()), default=0)
    return Layout(
        nodes=nodes,
        edges=edges,
        width=2 * PAD + (depth + 1) * NODE_W + depth * GAP_X,
        height=2 * PAD + tallest * NODE_H + max(tallest - 1, 0) * GAP_Y,
        depth=depth,
    )
