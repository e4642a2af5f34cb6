"""SPT's allocation (SPEC 2) over scores that stay where they are: no rank ever gathers scores.

The entries are totally ordered by (score descending, canonical global index ascending); the top-τ set is a
prefix of that order, described by a cut (key K, index G): key > K, or key == K and index <= G. Keys are the
int32 bit patterns of the fp32 scores, which order like the scores for non-negative floats.

Cost(τ) is monotone in τ (see layout.UnitCosts), so "the τ whose cost is closest to the budget" needs only
"the longest prefix with cost <= X" (two or three times). That search works on per-unit pick counts,
all-reduced:
  1. one pass: a histogram per unit over the top 11 key bits (2048 bins), all-reduced → the cost of taking
     whole bins, so the bin holding the boundary is known;
  2. one pass: this rank's entries in that bin (usually a tiny fraction), sorted locally;
  3. bisection over the bin's keys and then over the global index of tied entries: each probe all-reduces
     one int64 count per unit (≈ 50 probes).
Everything is integer arithmetic, so the cut is exact and identical on every world size.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch
import torch.distributed as dist

from spt_dist.errors import UserError
from spt_dist.selection.layout import Layout, UnitCosts
from spt_dist.selection.scores import LocalScores

_SHIFT = 20  # level-1 bins: key >> 20, i.e. sign (always 0), exponent and 3 mantissa bits
_BINS = 1 << (31 - _SHIFT)
_CHUNK = 1 << 22  # entries per vectorised step: temporaries stay in cache
_INF_KEY = 0x7F800000  # bit pattern of +inf; anything above is NaN
_NOTHING = (torch.iinfo(torch.int32).max, -1)  # a cut that selects nothing


@dataclass
class Segment:
    """A contiguous run of one unit's entries held by this rank."""

    unit: int
    gstart: int  # canonical global index of keys[0]
    keys: torch.Tensor  # int32 view of the scores


@dataclass
class Cut:
    key: int
    index: int
    picks: torch.Tensor  # [units] int64, global
    cost: int

    @property
    def tau(self) -> int:
        return int(self.picks.sum())


def split_into_segments(scores: LocalScores, layout: Layout) -> list[Segment]:
    spans = layout.unit_spans()
    starts = [s[0] for s in spans]
    segments = []
    for chunk in scores.sorted(layout):
        g0 = layout.tensor(chunk.tensor).offset + chunk.start
        g1 = g0 + chunk.values.numel()
        keys = chunk.values.view(torch.int32)
        i = max(bisect.bisect_right(starts, g0) - 1, 0)
        while i < len(spans) and spans[i][0] < g1:
            u0, u1, unit = spans[i]
            lo, hi = max(g0, u0), min(g1, u1)
            if lo < hi:
                segments.append(Segment(unit, lo, keys[lo - g0 : hi - g0]))
            i += 1
    return segments


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t)
    return t


class ThresholdSearch:
    def __init__(self, segments: list[Segment], layout: Layout, costs: UnitCosts) -> None:
        self.segments, self.layout, self.costs = segments, layout, costs
        self.units = len(layout.units)
        self.total_entries = layout.scored_params
        hist = torch.zeros(self.units, _BINS, dtype=torch.int64)
        for seg in segments:
            for i in range(0, seg.keys.numel(), _CHUNK):
                part = seg.keys[i : i + _CHUNK]
                lo, hi = torch.aminmax(part)
                if lo < 0 or hi > _INF_KEY:
                    name = layout.units[seg.unit].name
                    raise UserError(f"scores of '{name}' hold NaN or negative values; the score pass diverged "
                                    "(check the data and the model checkpoint)")
                hist[seg.unit] += torch.bincount(part >> _SHIFT, minlength=_BINS)
        _all_reduce(hist)
        # at_edge[:, b]: picks per unit when every bin >= b is taken; column _BINS: nothing taken.
        self.at_edge = torch.cat([hist.flip(1).cumsum(1).flip(1), torch.zeros(self.units, 1, dtype=torch.int64)], 1)
        self.edge_cost = costs.total(self.at_edge.T)  # [_BINS + 1], non-increasing
        self._candidates: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    # -------------------------------------------------------------------------------------------- cuts

    def everything(self) -> Cut:
        picks = self.at_edge[:, 0].clone()
        return Cut(-1, -1, picks, int(self.costs.total(picks)))

    def nothing(self) -> Cut:
        picks = torch.zeros(self.units, dtype=torch.int64)
        return Cut(*_NOTHING, picks, int(self.costs.total(picks)))

    def _bin_candidates(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's entries in bin b as (keys desc, global index asc within equal keys, unit)."""
        if b not in self._candidates:
            keys, index, unit = [], [], []
            for seg in self.segments:
                for i in range(0, seg.keys.numel(), _CHUNK):
                    part = seg.keys[i : i + _CHUNK]
                    where = torch.nonzero((part >> _SHIFT) == b).view(-1)
                    if where.numel():
                        keys.append(part[where].long())
                        index.append(where + (seg.gstart + i))
                        unit.append(torch.full_like(where, seg.unit))
            keys = torch.cat(keys) if keys else torch.zeros(0, dtype=torch.int64)
            index = torch.cat(index) if index else torch.zeros(0, dtype=torch.int64)
            unit = torch.cat(unit) if unit else torch.zeros(0, dtype=torch.int64)
            order = torch.argsort(index, stable=True)  # segments come in index order; make sure
            keys, index, unit = keys[order], index[order], unit[order]
            order = torch.argsort(-keys, stable=True)  # key descending, index ascending among ties
            self._candidates[b] = (keys[order], index[order], unit[order])
        return self._candidates[b]

    def _picks(self, b: int, key: int, index: int) -> torch.Tensor:
        """Global picks per unit of the cut (key, index), which lies in bin b (collective)."""
        keys, idx, unit = self._bin_candidates(b)
        neg = -keys
        above = int(torch.searchsorted(neg, -key, side="left"))  # entries with key > cut key
        tied_end = int(torch.searchsorted(neg, -key, side="right"))
        taken = above + int(torch.searchsorted(idx[above:tied_end], index, side="right"))
        local = torch.bincount(unit[:taken], minlength=self.units)
        return _all_reduce(local) + self.at_edge[:, b + 1]

    def longest_prefix(self, limit: int) -> Cut | None:
        """The longest prefix of the order whose cost is <= limit; None if even the empty one costs more."""
        if int(self.edge_cost[0]) <= limit:
            return self.everything()
        if int(self.edge_cost[_BINS]) > limit:
            return None
        # The boundary bin: taking every bin above it fits, taking it too does not.
        b = int(torch.nonzero(self.edge_cost > limit).max())

        def fits(picks: torch.Tensor) -> bool:
            return int(self.costs.total(picks)) <= limit

        lo, hi = (b << _SHIFT) - 1, ((b + 1) << _SHIFT) - 1  # "key > lo" does not fit, "key > hi" fits
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if fits(self._picks(b, mid, -1)):
                hi = mid
            else:
                lo = mid
        key = hi  # entries with exactly this key exist, and taking all of them does not fit
        lo, hi = -1, self.total_entries  # among ties (index ascending): "index <= lo" fits, "<= hi" does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if fits(self._picks(b, key, mid)):
                lo = mid
            else:
                hi = mid
        picks = self._picks(b, key, lo)
        return Cut(key, lo, picks, int(self.costs.total(picks)))

    def _next_unit(self, cut: Cut) -> int:
        """The unit of the first entry after the cut, over all ranks (collective)."""
        best = torch.tensor([-1, -1, -1], dtype=torch.int64)  # (key, -index, unit): max wins
        for b in sorted(self._candidates, reverse=True):
            keys, idx, unit = self._candidates[b]
            after = (keys < cut.key) | ((keys == cut.key) & (idx > cut.index))
            if after.any():
                i = int(torch.nonzero(after)[0])
                best = torch.tensor([int(keys[i]), -int(idx[i]), int(unit[i])])
                break
        everyone = [torch.empty_like(best) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, best)
        return int(max(everyone, key=lambda t: (int(t[0]), int(t[1])))[2])

    def closest_to(self, target: int) -> Cut:
        """The cut whose cost is closest to target; ties go to the larger τ (SPEC 2)."""
        below = self.longest_prefix(target)
        if below is None:  # even τ = 0 costs more: the longest prefix that costs the same as nothing
            return self.longest_prefix(int(self.edge_cost[_BINS]))
        if below.tau == self.total_entries:
            return below
        # The next entry lies in the bin searched last (the whole bin did not fit), so its candidates are cached.
        picks = below.picks.clone()
        picks[self._next_unit(below)] += 1
        above_cost = int(self.costs.total(picks))
        if above_cost - target <= target - below.cost:
            return self.longest_prefix(above_cost)
        return below

    def selected(self, cut: Cut, units: set[int]) -> list[tuple[int, torch.Tensor]]:
        """(unit, global indices) of this rank's selected entries in the given units."""
        out = []
        for seg in self.segments:
            if seg.unit not in units:
                continue
            for i in range(0, seg.keys.numel(), _CHUNK):
                part = seg.keys[i : i + _CHUNK].long()
                take = (part > cut.key) | ((part == cut.key) & (torch.arange(part.numel()) + seg.gstart + i <= cut.index))
                where = torch.nonzero(take).view(-1)
                if where.numel():
                    out.append((seg.unit, where + seg.gstart + i))
        return out


def target_cost(budget: float, layout: Layout) -> int:
    """The budget as a parameter count: a count as given, a fraction of the backbone's parameters."""
    target = int(budget) if budget >= 1 else round(budget * layout.backbone_params)
    if target <= 0:
        raise UserError(f"selection.budget: {budget} is less than one parameter of this model")
    if target > layout.scored_params:
        raise UserError(f"selection.budget: {target:,} parameters is more than the {layout.scored_params:,} "
                        "scored parameters")
    return target
