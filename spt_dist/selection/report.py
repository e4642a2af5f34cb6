"""The allocation for people: a heat map and a one-screen summary (its files: Allocation.save)."""

from __future__ import annotations

import re

from spt_dist.atomic import atomic_path

_SHORT = {"lora": "L", "adapter": "A", "full": "F", "sparse": "", "frozen": "."}


def _families() -> tuple[list[str], re.Pattern]:
    """Matrix types of every family, in column order (those an allocation has are shown; the vectors follow),
    and a block of any family ('blocks.3.' for ViT and EVA-02, 'layers.2.blocks.5.' for Swin; rows in the
    order met): from the families' specs."""
    from spt_dist.backbones.base import all_matrix_types, block_pattern  # noqa: PLC0415 - timm, when drawn
    return list(all_matrix_types()), re.compile(f"^({block_pattern()})\\.")


def _grid(record: dict) -> tuple[int, list[str], dict[tuple[int, str], list[dict]]]:
    """Units by (block, column); vectors of a block share one column. Blocks are numbered in model order."""
    columns, block_re = _families()
    cells: dict[tuple[int, str], list[dict]] = {}
    rows: dict[str, int] = {}
    for u in record["units"]:
        found = block_re.match(u["name"])
        if not found:
            continue
        block = rows.setdefault(found.group(1), len(rows))
        column = "vectors" if u["kind"] == "vector" else u["name"].rsplit(".", 1)[-1]
        if column == "vectors" or column in columns:
            cells.setdefault((block, column), []).append(u)
    present = {c for _, c in cells}
    return len(rows), [c for c in columns if c in present] + ["vectors"], cells


def _cell_text(units: list[dict]) -> str:
    if len(units) == 1 and units[0]["decision"] != "sparse":
        u = units[0]
        return _SHORT[u["decision"]] + (str(u["rank"]) if "rank" in u else "")
    if all(u["decision"] == "frozen" for u in units):
        return "."
    full = sum(u["decision"] == "full" for u in units)
    sparse = sum(u["cost"] for u in units if u["decision"] == "sparse")
    return (f"F{full} " if full else "") + (f"{sparse:,}" if sparse else "")


def summary(record: dict) -> str:
    """A one-screen text summary: totals, then one line per block."""
    t = record["totals"]
    if record["method"] == "spt":
        s = record["settings"]
        thr = record["threshold"]["score"]
        lines = [
            f"SPT allocation ({s['structured']} r{s['module_rank']}, alpha {s['alpha']:g}, beta {s['beta']:g}): "
            f"budget {record['target']:,} ({100 * record['target'] / record['backbone_params']:.3f}% of "
            f"{record['backbone_params']:,} backbone params) -> cost {record['cost']:,} "
            f"({record['cost_minus_target']:+,})",
            f"  tau {record['tau']:,} of {record['scored_params']:,} scored entries"
            + (f" (score >= {thr:.3e})" if thr is not None else ""),
            f"  {t['modules']} modules ({t['module_params']:,} params) | {t['sparse_entries']:,} sparse entries "
            f"in {t['sparse_units']} tensors | {t['full_vectors']} full vectors ({t['full_vector_params']:,}) | "
            f"cls_token {t['cls_token']:,}",
            "  cells: L/A = LoRA/Adapter rank, F = fully tuned vectors, numbers = sparse entries, . = frozen",
        ]
    else:
        lines = [f"GPS allocation (top-{record['settings']['k']} inputs per row): {t['sparse_entries']:,} sparse "
                 f"entries + {t['full_vectors']} full vectors ({t['full_vector_params']:,}: biases, layer "
                 f"scales) = {record['cost']:,} "
                 f"({100 * record['cost'] / record['backbone_params']:.3f}% of {record['backbone_params']:,} "
                 "backbone params)"]
    blocks, columns, cells = _grid(record)
    width = 10
    lines.append("  block " + "".join(c.rjust(width) for c in columns))
    for b in range(blocks):
        lines.append(f"  {b:5d} " + "".join(_cell_text(cells.get((b, c), [])).rjust(width) for c in columns))
    return "\n".join(lines)


def heatmap(record: dict):
    """A matplotlib figure: blocks x matrix types, coloured by the parameters spent there."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    blocks, columns, cells = _grid(record)
    spent = np.zeros((max(blocks, 1), len(columns)))
    for (b, c), units in cells.items():
        spent[b, columns.index(c)] = sum(u["cost"] for u in units)
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.32 * blocks))
    image = ax.imshow(spent, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(blocks), [str(b) for b in range(blocks)])
    ax.set_ylabel("block")
    if blocks <= 40:
        top = spent.max() or 1.0
        for (b, c), units in cells.items():
            ax.text(columns.index(c), b, _cell_text(units), ha="center", va="center", fontsize=7,
                    color="black" if spent[b, columns.index(c)] > 0.6 * top else "white")
    fig.colorbar(image, ax=ax, label="trainable parameters")
    ax.set_title(f"{record['method'].upper()}: where the budget went (cost {record['cost']:,})", fontsize=9)
    fig.tight_layout()
    return fig


def save_heatmap(record: dict, path: str):
    fig = heatmap(record)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    return fig
