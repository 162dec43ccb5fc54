"""A picture of a sliced graph: ops coloured by stage, so a plan's cuts can be seen at a glance.

Layered layout: graph inputs in the first column, every op one column right of its deepest
producer, ops of a column sorted by stage. Edges that cross a stage boundary are drawn dashed and
thicker (they are the tensors that travel between servers). SVG is written directly; PNG is drawn
with matplotlib when it is installed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

from swarmshard.core.graph import OpGraph
from swarmshard.core.graph_plan import GraphPlan

__all__ = ["PictureError", "Layout", "layout", "write_picture", "render_svg", "STAGE_COLORS"]

STAGE_COLORS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2",
                "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac")
INPUT_COLOR = "#d9d9d9"
BOX_W, BOX_H, GAP_X, GAP_Y, MARGIN = 118, 26, 46, 12, 20


class PictureError(ValueError):
    """The picture cannot be written (unknown format, missing matplotlib); says what to do."""


@dataclass
class Layout:
    """Column/row of every graph input and op, the stage of every op, and the edges to draw."""

    position: dict[str, tuple[int, int]]
    stage_of: dict[str, int]  # graph inputs are absent
    edges: list[tuple[str, str]]
    columns: int
    rows: int


def layout(graph: OpGraph, stages: Sequence[Sequence[str]]) -> Layout:
    stage_of = {op: s for s, ops in enumerate(stages) for op in ops}
    order = {op: i for i, op in enumerate(op for ops in stages for op in ops)}
    depth: dict[str, int] = {name: 0 for name in graph.inputs}
    for name in sorted(graph.nodes, key=order.__getitem__):  # plan order is topological
        node = graph.nodes[name]
        depth[name] = 1 + max((depth[src] for src in node.inputs), default=0)
    columns: dict[int, list[str]] = {}
    for name in depth:
        columns.setdefault(depth[name], []).append(name)
    position: dict[str, tuple[int, int]] = {}
    for col, names in columns.items():
        names.sort(key=lambda n: (stage_of.get(n, -1), order.get(n, -1)))
        for row, name in enumerate(names):
            position[name] = (col, row)
    edges = [(src, name) for name, node in graph.nodes.items() for src in node.inputs]
    return Layout(position, stage_of, edges, columns=max(columns) + 1, rows=max(len(v) for v in columns.values()))


def _color(stage: int | None) -> str:
    return INPUT_COLOR if stage is None else STAGE_COLORS[stage % len(STAGE_COLORS)]


def _legend_height(doc: GraphPlan) -> int:
    return 16 * ((len(doc.stages) + 3) // 4) + 12


def _arc_band(lay: Layout) -> int:
    """Room above the first row for the arcs of edges that skip columns."""
    spans = [lay.position[d][0] - lay.position[s][0] for s, d in lay.edges]
    return min(140, 10 + 8 * max(spans, default=1)) if any(x > 1 for x in spans) else 0


def _edge(lay: Layout, src: str, dst: str, top: float) -> tuple[tuple[float, float], ...]:
    """Cubic Bezier points of an edge: neighbours join side to side, skips arc over the boxes."""
    (x1, y1), (x2, y2) = _xy(lay.position[src], top), _xy(lay.position[dst], top)
    span = lay.position[dst][0] - lay.position[src][0]
    if span <= 1:
        mid = (x1 + BOX_W + x2) / 2
        a, b = (x1 + BOX_W, y1 + BOX_H / 2), (x2, y2 + BOX_H / 2)
        return a, (mid, a[1]), (mid, b[1]), b
    lift = min(130, 8 * span + 10)
    a, b = (x1 + BOX_W * 0.75, y1), (x2 + BOX_W * 0.25, y2)
    return a, (a[0] + 30, min(a[1], b[1]) - lift), (b[0] - 30, min(a[1], b[1]) - lift), b


def _edge_style(lay: Layout, src: str, dst: str) -> str:
    """"cut" for values that travel between stage servers, "input" for graph inputs, else "local"."""
    if src not in lay.stage_of:
        return "input"
    return "cut" if lay.stage_of[src] != lay.stage_of.get(dst) else "local"


def _xy(pos: tuple[int, int], top: float) -> tuple[float, float]:
    col, row = pos
    return MARGIN + col * (BOX_W + GAP_X), top + row * (BOX_H + GAP_Y)


def _label(name: str, limit: int = 16) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _legend(doc: GraphPlan) -> list[tuple[int, str]]:
    costs = doc.core_plan().costs
    worst = max(range(len(costs)), key=lambda i: costs[i].total) if costs else -1
    return [(i, f"stage {i}: {len(entry.ops)} ops, {costs[i].total * 1e3:.3g} ms" + (" (bottleneck)" if i == worst else ""))
            for i, entry in enumerate(doc.stages)]


def render_svg(graph: OpGraph, doc: GraphPlan) -> str:
    """The picture as an SVG document (every op is a ``<g class="op" data-stage=...>``)."""
    lay = layout(graph, [entry.ops for entry in doc.stages])
    width = 2 * MARGIN + lay.columns * (BOX_W + GAP_X) - GAP_X
    width = max(width, 2 * MARGIN + 230 * min(len(doc.stages), 4))
    top = MARGIN + _legend_height(doc) + _arc_band(lay)
    height = top + MARGIN + lay.rows * (BOX_H + GAP_Y) - GAP_Y
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="sans-serif" font-size="11">',
           f"<title>{escape(doc.factory)}: {len(doc.stages)} stages ({escape(doc.graph_id)})</title>",
           f'<rect width="{width:.0f}" height="{height:.0f}" fill="white"/>']
    for k, (i, text) in enumerate(_legend(doc)):
        x = MARGIN + (k % 4) * 230
        y = MARGIN + (k // 4) * 16 - 6
        out.append(f'<rect x="{x}" y="{y}" width="12" height="12" fill="{_color(i)}"/>'
                   f'<text x="{x + 16}" y="{y + 10}">{escape(text)}</text>')
    out.append('<g class="edges" fill="none">')
    styles = {"cut": 'stroke="#222" stroke-width="1.8" stroke-dasharray="5,3"',
              "input": 'stroke="#bbb" stroke-width="1"', "local": 'stroke="#888" stroke-width="1"'}
    for src, dst in lay.edges:
        (ax, ay), (bx, by), (cx, cy), (dx, dy) = _edge(lay, src, dst, top)
        kind = _edge_style(lay, src, dst)
        out.append(f'<path class="{kind}" d="M{ax:.1f},{ay:.1f} C{bx:.1f},{by:.1f} {cx:.1f},{cy:.1f} {dx:.1f},{dy:.1f}" '
                   f"{styles[kind]}/>")
    out.append("</g>")
    outputs = set(doc.outputs)
    for name, pos in lay.position.items():
        x, y = _xy(pos, top)
        stage = lay.stage_of.get(name)
        node = graph.nodes.get(name)
        kind = "input" if node is None else "op"
        detail = "graph input" if node is None else f"{node.target}; stage {stage}; out {list(node.output_shapes)}"
        border = 'stroke="#000" stroke-width="2.5"' if name in outputs else 'stroke="#555" stroke-width="0.8"'
        stage_attr = f' data-stage="{stage}"' if stage is not None else ""
        out.append(f'<g class="{kind}" data-name="{escape(name)}"{stage_attr}>'
                   f"<title>{escape(name)}: {escape(detail)}</title>"
                   f'<rect x="{x:.0f}" y="{y:.0f}" width="{BOX_W}" height="{BOX_H}" rx="5" fill="{_color(stage)}" {border}/>'
                   f'<text x="{x + BOX_W / 2:.0f}" y="{y + BOX_H / 2 + 4:.0f}" text-anchor="middle">{escape(_label(name))}</text></g>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _render_png(graph: OpGraph, doc: GraphPlan, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import FancyBboxPatch, Patch, PathPatch
        from matplotlib.path import Path as MplPath
    except ImportError:
        raise PictureError("PNG pictures need matplotlib (pip install matplotlib); write an .svg instead") from None
    lay = layout(graph, [entry.ops for entry in doc.stages])
    width = lay.columns * (BOX_W + GAP_X) + 2 * MARGIN
    top = MARGIN + _legend_height(doc) + _arc_band(lay)
    height = top + MARGIN + lay.rows * (BOX_H + GAP_Y)
    scale = 1 / 90  # pixels of the SVG layout -> inches
    fig = plt.figure(figsize=(min(max(width * scale, 6), 120), min(max(height * scale, 3), 120)), dpi=90)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.axis("off")
    styles = {"cut": ("#222", 1.6, "--"), "input": ("#bbb", 0.8, "-"), "local": ("#888", 0.8, "-")}
    for src, dst in lay.edges:
        color, width_pt, dash = styles[_edge_style(lay, src, dst)]
        curve = MplPath(_edge(lay, src, dst, top), [MplPath.MOVETO, MplPath.CURVE4, MplPath.CURVE4, MplPath.CURVE4])
        ax.add_patch(PathPatch(curve, facecolor="none", edgecolor=color, linewidth=width_pt, linestyle=dash, zorder=1))
    outputs = set(doc.outputs)
    for name, pos in lay.position.items():
        x, y = _xy(pos, top)
        ax.add_patch(FancyBboxPatch((x, y), BOX_W, BOX_H, boxstyle="round,pad=0,rounding_size=5",
                                    facecolor=_color(lay.stage_of.get(name)), zorder=2,
                                    edgecolor="black", linewidth=2.0 if name in outputs else 0.6))
        ax.text(x + BOX_W / 2, y + BOX_H / 2, _label(name), ha="center", va="center", fontsize=7, zorder=3)
    ax.legend(handles=[Patch(color=_color(i), label=text) for i, text in _legend(doc)],
              loc="upper left", fontsize=7, ncol=min(4, len(doc.stages)), frameon=False)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_picture(graph: OpGraph, doc: GraphPlan, path: str | Path) -> Path:
    """Write the picture as SVG or PNG, chosen by the file's extension."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".svg":
        path.write_text(render_svg(graph, doc))
    elif suffix == ".png":
        _render_png(graph, doc, path)
    else:
        raise PictureError(f"picture {path} must end in .svg or .png")
    return path
