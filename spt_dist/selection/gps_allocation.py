"""GPS's allocation (SPEC 3): for every output row of every eligible weight, the K inputs with the largest
score; ties go to the lower input index. Rows a rank holds whole are decided locally. A row split between
ranks (ZeRO's flat partitions cut rows) is decided from each holder's own top-K candidates: at most K
(score, index) pairs per piece are exchanged, never the row's scores.
"""

from __future__ import annotations

import torch

from spt_dist.distributed import gather_to_main
from spt_dist.errors import UserError
from spt_dist.selection.layout import Layout
from spt_dist.selection.scores import LocalScores

_CHUNK = 1 << 22


def topk_rows(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices [rows, k] (ascending) of each row's k largest scores; ties to the lower column."""
    kth = scores.topk(k, dim=1).values[:, -1:]
    above = scores > kth
    tied = scores == kth
    room = k - above.sum(1, keepdim=True)
    take = above | (tied & (tied.cumsum(1) <= room))
    return torch.nonzero(take)[:, 1].view(-1, k)


def _piece_candidates(values: torch.Tensor, first: int, k: int) -> list[tuple[float, int]]:
    """A split row's piece: its top-min(k, len) entries as (score, flat index)."""
    cols = topk_rows(values.view(1, -1), min(k, values.numel()))[0]
    return [(float(values[c]), first + int(c)) for c in cols]


def check_k(layout: Layout, k: int) -> None:
    for t in layout.tensors:
        if k > t.row_length:
            raise UserError(f"selection.k: {k} is wider than the rows of '{t.name}' ({t.row_length} inputs)")


def select_rows(scores: LocalScores, layout: Layout, k: int) -> dict[str, torch.Tensor]:
    """{tensor: sorted flat indices of its selected entries}, complete on rank 0 (collective)."""
    check_k(layout, k)
    local: dict[str, list[torch.Tensor]] = {t.name: [] for t in layout.tensors}
    pieces: list[tuple[str, int, list[tuple[float, int]]]] = []  # (tensor, row, candidates)
    for chunk in scores.chunks:
        length = layout.tensor(chunk.tensor).row_length
        f0, f1 = chunk.start, chunk.start + chunk.values.numel()
        r0, r1 = -(-f0 // length), f1 // length  # rows held whole: [r0, r1)
        if r0 > r1:  # the chunk lies inside one row
            pieces.append((chunk.tensor, f0 // length, _piece_candidates(chunk.values, f0, k)))
            continue
        if f0 < r0 * length:
            pieces.append((chunk.tensor, f0 // length, _piece_candidates(chunk.values[: r0 * length - f0], f0, k)))
        if r1 * length < f1:
            pieces.append((chunk.tensor, r1, _piece_candidates(chunk.values[r1 * length - f0 :], r1 * length, k)))
        rows_per_step = max(1, _CHUNK // length)
        for r in range(r0, r1, rows_per_step):
            r_end = min(r + rows_per_step, r1)
            block = chunk.values[r * length - f0 : r_end * length - f0].view(r_end - r, length)
            cols = topk_rows(block, k)
            local[chunk.tensor].append((cols + torch.arange(r, r_end)[:, None] * length).view(-1))

    gathered_pieces = gather_to_main(pieces)
    merged = {name: torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64) for name, parts in local.items()}
    gathered = gather_to_main(merged)
    if gathered is None:
        return {}

    split_rows: dict[tuple[str, int], list[tuple[float, int]]] = {}
    for rank_pieces in gathered_pieces:
        for tensor, row, candidates in rank_pieces:
            split_rows.setdefault((tensor, row), []).extend(candidates)
    extra: dict[str, list[int]] = {}
    for (tensor, _), candidates in split_rows.items():
        candidates.sort(key=lambda c: (-c[0], c[1]))
        extra.setdefault(tensor, []).extend(index for _, index in candidates[:k])
    out = {}
    for t in layout.tensors:
        parts = [g[t.name] for g in gathered] + [torch.tensor(extra.get(t.name, []), dtype=torch.int64)]
        out[t.name] = torch.sort(torch.cat(parts)).values
    return out
