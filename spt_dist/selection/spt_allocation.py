"""SPT's allocation (SPEC 2) over scores that stay where they are: no rank ever gathers scores.

The entries are totally ordered by (score descending, canonical global index ascending); the top-τ set is a
prefix of that order, described by a cut (key K, index G): key > K, or key == K and index <= G. Keys are the
int32 bit patterns of the fp32 scores, which order like the scores for non-negative floats.

Cost(τ) is monotone in τ (see layout.UnitCosts), so "the τ whose cost is closest to the budget" needs only
"the longest prefix with cost <= X" (two or three times). That search works on per-unit pick counts,
all-reduced, like a radix select:
  1. one pass over the scores: a histogram per unit of the top 11 key bits (2048 bins), all-reduced: the cost
     of taking whole bins, so the bin holding the boundary is known;
  2. one pass: this rank's entries in that bin (usually well under 1 %), kept as candidates;
  3. on the candidates only: per-unit histograms of the next 10 key bits, then of the last 10, all-reduced,
     pin the boundary key exactly; a bisection over the global index of the entries tied at that key (each
     probe all-reduces one int64 count per unit) places the cut among them.
Everything is integer arithmetic, so the cut is exact and identical on every world size.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from spt_dist.distributed import all_gather_tensor, all_reduce_
from spt_dist.errors import UserError
from spt_dist.selection.layout import Layout, UnitCosts
from spt_dist.selection.scores import LocalScores

_SHIFT = 20  # level-1 bins: key >> 20, i.e. sign (always 0), exponent and 3 mantissa bits
_BINS = 1 << (31 - _SHIFT)
_SUB_BITS = 10  # levels 2 and 3 split the remaining 20 key bits
_SUB_MASK = (1 << _SUB_BITS) - 1
_CHUNK = 1 << 18  # entries per vectorised step: temporaries stay in cache
_INF_KEY = 0x7F800000  # bit pattern of +inf; anything above is NaN


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


_EIGHT = torch.arange(8)


def _positions(flags: torch.Tensor) -> torch.Tensor:
    """torch.nonzero of a mostly-zero 1-D int32 0/1 tensor, fast: on CPU, comparisons into bool tensors and
    nonzero are the slow eager ops (~0.4 ns/entry each), in-place int32 comparisons are several times faster,
    and nonzero over the flags read 8 at a time as int64 words scans 8x fewer elements."""
    mask = flags.bool()
    whole = mask.numel() // 8 * 8
    words = torch.nonzero(mask[:whole].view(torch.int64)).view(-1)
    where = (words[:, None] * 8 + _EIGHT).view(-1)
    where = where[mask[where]]
    if whole < mask.numel():
        where = torch.cat([where, torch.nonzero(mask[whole:]).view(-1) + whole])
    return where


def _taking_bins_from(hist: torch.Tensor) -> torch.Tensor:
    """[units, bins + 1]: column s holds the picks per unit when every bin >= s is taken (the last: none)."""
    return torch.cat([hist.flip(1).cumsum(1).flip(1), torch.zeros(hist.shape[0], 1, dtype=torch.int64)], 1)


class ThresholdSearch:
    def __init__(self, segments: list[Segment], layout: Layout, costs: UnitCosts) -> None:
        self.segments, self.costs = segments, costs
        self.units = len(layout.units)
        self.total_entries = layout.scored_params
        hist = torch.zeros(self.units, _BINS, dtype=torch.int64)
        # Each chunk's own histogram (2048 counts): the later passes skip chunks with nothing in the bins they
        # look for (scores span orders of magnitude across layers, so many chunks hold nothing near the cut).
        self._chunk_hists: list[torch.Tensor] = []
        invalid = torch.zeros(self.units, 1, dtype=torch.int64)  # per unit: chunks with NaN or negative scores
        for seg in segments:
            for i in range(0, seg.keys.numel(), _CHUNK):
                part = seg.keys[i : i + _CHUNK]
                lo, hi = torch.aminmax(part)
                if lo < 0 or hi > _INF_KEY:
                    invalid[seg.unit] += 1
                    part = part.clamp(0, _INF_KEY)  # keeps bincount valid; the run stops below, on every rank
                self._chunk_hists.append(torch.bincount(part >> _SHIFT, minlength=_BINS))
                hist[seg.unit] += self._chunk_hists[-1]
        hist = all_reduce_(torch.cat([hist, invalid], 1))  # one collective: every rank sees any bad unit
        hist, invalid = hist[:, :_BINS], hist[:, _BINS]
        if invalid.any():
            name = layout.units[int(torch.nonzero(invalid)[0])].name
            raise UserError(f"scores of '{name}' hold NaN or negative values; the score pass diverged "
                            "(check the data and the model checkpoint)")
        self.at_edge = _taking_bins_from(hist)
        self.edge_cost = costs.total(self.at_edge.T)  # [_BINS + 1], non-increasing
        self._candidates: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._above: dict[int, tuple[list[bool], list[tuple[int, torch.Tensor]]]] = {}

    def _chunks(self):
        """(segment, offset of the chunk in it, chunk keys, the chunk's level-1 histogram), in a fixed order."""
        n = 0
        for seg in self.segments:
            for i in range(0, seg.keys.numel(), _CHUNK):
                yield seg, i, seg.keys[i : i + _CHUNK], self._chunk_hists[n]
                n += 1

    # -------------------------------------------------------------------------------------------- cuts

    def everything(self) -> Cut:
        picks = self.at_edge[:, 0].clone()
        return Cut(-1, -1, picks, int(self.costs.total(picks)))

    def _bin_candidates(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's entries in level-1 bin b as (key, global index, unit), int64, in index order.

        The same pass keeps, for `selected`, the entries above bin b in the units that may still end up sparse:
        those not yet switched with every bin above b taken (switching is monotone in the picks). They have
        fewer picks than their switch point, so these lists stay small."""
        if b not in self._candidates:
            maybe_sparse = (~self.costs.switched(self.at_edge[:, b + 1])).tolist()
            keys, index, unit, above = [], [], [], []
            for seg, i, part, chunk_hist in self._chunks():
                first = seg.gstart + i
                if maybe_sparse[seg.unit] and chunk_hist[b + 1 :].any():
                    where = _positions((part >> _SHIFT).ge_(b))
                    in_bin = (part[where] >> _SHIFT) == b
                    above.append((seg.unit, where[~in_bin] + first))
                    where = where[in_bin]
                elif chunk_hist[b]:
                    where = _positions((part >> _SHIFT).eq_(b))
                else:
                    continue
                keys.append(part[where].long())
                index.append(where + first)
                unit.append(torch.full_like(where, seg.unit))
            empty = torch.zeros(0, dtype=torch.int64)
            self._candidates[b] = tuple(torch.cat(x) if x else empty for x in (keys, index, unit))
            self._above[b] = (maybe_sparse, above)
        return self._candidates[b]

    def _unit_histogram(self, unit: torch.Tensor, bins: torch.Tensor, width: int) -> torch.Tensor:
        """[units, width] global counts of (unit, bin) pairs (collective)."""
        flat = torch.bincount(unit * width + bins, minlength=self.units * width)
        return all_reduce_(flat.view(self.units, width))

    def _boundary(self, hist: torch.Tensor, base: torch.Tensor, limit: int) -> tuple[int, torch.Tensor]:
        """The bin s where the prefix crosses `limit`: taking `base` plus every bin above s costs <= limit,
        taking bin s too costs more. Returns s and the picks of `base` plus the bins above s."""
        at_edge = _taking_bins_from(hist) + base[:, None]
        s = int(torch.nonzero(self.costs.total(at_edge.T) > limit).max())
        return s, at_edge[:, s + 1]

    def longest_prefix(self, limit: int) -> Cut | None:
        """The longest prefix of the order whose cost is <= limit; None if even the empty one costs more."""
        if int(self.edge_cost[0]) <= limit:
            return self.everything()
        if int(self.edge_cost[_BINS]) > limit:
            return None
        # Level 1: the boundary bin b (every bin above it fits, taking it too does not).
        b = int(torch.nonzero(self.edge_cost > limit).max())
        keys, index, unit = self._bin_candidates(b)
        base, key = self.at_edge[:, b + 1], b
        # Levels 2 and 3: the same on the candidates, 10 key bits at a time, down to the exact key.
        for shift in (_SUB_BITS, 0):
            s, base = self._boundary(self._unit_histogram(unit, (keys >> shift) & _SUB_MASK, _SUB_MASK + 1),
                                     base, limit)
            keep = ((keys >> shift) & _SUB_MASK) == s
            keys, index, unit, key = keys[keep], index[keep], unit[keep], (key << _SUB_BITS) | s
        # Entries with a key above `key` fit (base); all of those tied at it do not. The candidates are in
        # global index order (so are the segments), hence so are the ties.

        def tied_picks(last: int) -> torch.Tensor:  # base + tied entries with global index <= last
            taken = int(torch.searchsorted(index, last, side="right"))
            return base + all_reduce_(torch.bincount(unit[:taken], minlength=self.units))

        lo, hi = -1, self.total_entries  # "index <= lo" fits, "index <= hi" does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if int(self.costs.total(tied_picks(mid))) <= limit:
                lo = mid
            else:
                hi = mid
        picks = tied_picks(lo)
        return Cut(key, lo, picks, int(self.costs.total(picks)))

    def _next_unit(self, cut: Cut) -> int:
        """The unit of the first entry after the cut, over all ranks (collective). It lies in the bin searched
        last (taking that whole bin did not fit), whose candidates are cached."""
        best = torch.tensor([-1, -1, -1], dtype=torch.int64)  # (key, -index, unit): max wins
        keys, index, unit = self._candidates[cut.key >> _SHIFT]
        after = (keys < cut.key) | ((keys == cut.key) & (index > cut.index))
        if after.any():
            top = keys[after].max()
            first = index[after & (keys == top)].min()
            best = torch.tensor([int(top), -int(first), int(unit[index == first][0])])
        return int(max(all_gather_tensor(best), key=lambda t: (int(t[0]), int(t[1])))[2])

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
        """(unit, global indices) of this rank's selected entries in the given units (sparse ones under the cut):
        those above the cut's level-1 bin, kept by the candidate pass, and those in it that are above the cut
        or tied at it up to its index."""
        if cut.key < 0:  # everything
            return [(seg.unit, torch.arange(seg.gstart, seg.gstart + seg.keys.numel()))
                    for seg in self.segments if seg.unit in units]
        b = cut.key >> _SHIFT
        keys, index, unit = self._candidates[b]
        maybe_sparse, above = self._above[b]
        assert all(maybe_sparse[u] for u in units), "a unit switched above the cut's bin cannot be sparse"
        out = [(u, where) for u, where in above if u in units and where.numel()]
        taken = (keys > cut.key) | ((keys == cut.key) & (index <= cut.index))
        unit, index = unit[taken], index[taken]
        order = torch.argsort(unit, stable=True)  # grouped by unit, index order kept within each
        groups, counts = torch.unique_consecutive(unit[order], return_counts=True)
        for u, where in zip(groups.tolist(), torch.split(index[order], counts.tolist())):
            if u in units:
                out.append((u, where))
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
