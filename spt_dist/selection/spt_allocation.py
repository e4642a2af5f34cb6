"""SPT's allocation (SPEC 2) over scores that stay where they are: no rank ever gathers scores.

The entries are totally ordered by (score descending, canonical global index ascending); the top-τ set is a
prefix of that order, described by a cut (key K, index G): key > K, or key == K and index <= G. Keys are the
int32 bit patterns of the fp32 scores, which order like the scores for non-negative floats.

Cost(τ) is monotone in τ (see layout.UnitCosts), so "the τ whose cost is closest to the budget" needs only
"the longest prefix with cost <= X" (two or three times). That search works on per-unit pick counts,
all-reduced, like a radix select:
  1. one pass over the scores: a histogram per unit of the top 11 key bits (2048 bins), all-reduced: the cost
     of taking whole bins, so the bin holding the boundary is known;
  2. one pass: this rank's entries in that bin (usually well under 1 %), kept as candidates; `closest_to` also
     needs the cut one entry further, whose cost is at most one unit's switch (a LoRA module) more, so the same
     pass keeps the bins down to that cost too when they are few (a second pass otherwise);
  3. on the candidates only: per-unit histograms of the next 10 key bits, then of the last 10, all-reduced,
     pin the boundary key exactly; a bisection over the global index of the entries tied at that key (each
     probe all-reduces one int64 count per unit) places the cut among them.
The two passes over the scores are the cost (bench/selection.py: allocation against one read of them); the
candidate pass compares in numpy, whose comparisons and nonzero are several times faster than torch's on CPU.
Everything is integer arithmetic, so the cut is exact and identical on every world size.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
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
_GATHERED_TIES = 1 << 16  # fewer entries tied at the cut's key are gathered, more are bisected over
_SPREAD = 4  # the candidate pass keeps further bins when they hold at most this many times the cut's bin


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


@dataclass
class _CandidatePass:
    """One pass's finds: this rank's entries in level-1 bins lo..hi (key, global index, unit; index order) and,
    per unit that may still be sparse with every bin above hi taken, its entries above bin hi."""

    lo: int
    hi: int
    keys: torch.Tensor
    index: torch.Tensor
    unit: torch.Tensor
    maybe_sparse: list[bool]
    above: list[tuple[int, torch.Tensor]]


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


def _taking_bins_from(hist: torch.Tensor) -> torch.Tensor:
    """[units, bins + 1]: column s holds the picks per unit when every bin >= s is taken (the last: none)."""
    return torch.cat([hist.flip(1).cumsum(1).flip(1), torch.zeros(hist.shape[0], 1, dtype=torch.int64)], 1)


class ThresholdSearch:
    def __init__(self, segments: list[Segment], layout: Layout, costs: UnitCosts) -> None:
        self.segments, self.costs = segments, costs
        self.units = len(layout.units)
        self.total_entries = layout.scored_params
        hist = torch.zeros(self.units, _BINS, dtype=torch.int64)
        # Each chunk's smallest and largest key: the candidate pass skips chunks with nothing in the bins it looks
        # for (scores span orders of magnitude across layers, so many chunks hold nothing near the cut).
        lowest, highest = [], []
        invalid = torch.zeros(self.units, 1, dtype=torch.int64)  # per unit: chunks with NaN or negative scores
        for seg, _, part in self._chunk_keys():
            values = part.numpy()
            lowest.append(int(values.min()))
            highest.append(int(values.max()))
            if lowest[-1] < 0 or highest[-1] > _INF_KEY:
                invalid[seg.unit] += 1
                part = part.clamp(0, _INF_KEY)  # keeps bincount valid; the run stops below, on every rank
            hist[seg.unit] += torch.bincount(part >> _SHIFT, minlength=_BINS)
        self._lowest, self._highest = torch.tensor(lowest), torch.tensor(highest)
        hist = all_reduce_(torch.cat([hist, invalid], 1))  # one collective: every rank sees any bad unit
        hist, invalid = hist[:, :_BINS], hist[:, _BINS]
        if invalid.any():
            name = layout.units[int(torch.nonzero(invalid)[0])].name
            raise UserError(f"scores of '{name}' hold NaN or negative values; the score pass diverged "
                            "(check the data and the model checkpoint)")
        self.at_edge = _taking_bins_from(hist)
        self.edge_cost = costs.total(self.at_edge.T)  # [_BINS + 1], non-increasing
        self._passes: list[_CandidatePass] = []
        self._bins: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._histograms: dict[tuple[int, int], torch.Tensor] = {}

    def _chunk_keys(self):
        """(segment, offset of the chunk in it, chunk keys), in a fixed order (that of self._lowest, _highest)."""
        for seg in self.segments:
            for i in range(0, seg.keys.numel(), _CHUNK):
                yield seg, i, seg.keys[i : i + _CHUNK]

    # -------------------------------------------------------------------------------------------- cuts

    def everything(self) -> Cut:
        picks = self.at_edge[:, 0].clone()
        return Cut(-1, -1, picks, int(self.costs.total(picks)))

    def _bin_of(self, limit: int) -> int:
        """The level-1 bin holding the boundary of the longest prefix costing <= limit (edge_cost[_BINS] <= limit
        < edge_cost[0]): every bin above it fits, taking it too does not."""
        return int(torch.nonzero(self.edge_cost > limit).max())

    def _population(self, lo: int, hi: int) -> int:
        """Entries (all ranks) in level-1 bins lo..hi."""
        return int(self.at_edge[:, lo].sum() - self.at_edge[:, hi + 1].sum())

    def _pass_for(self, b: int) -> _CandidatePass:
        """The candidates of level-1 bin b: from the pass that kept them, or a new pass."""
        for found in self._passes:
            if found.lo <= b <= found.hi:
                return found
        self._passes.append(self._candidate_pass(b, b))
        return self._passes[-1]

    def _in_bin(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The candidates in level-1 bin b (key, global index, unit; index order), kept for the next cut there."""
        if b not in self._bins:
            cands = self._pass_for(b)
            found = (cands.keys, cands.index, cands.unit)
            if cands.lo < cands.hi:  # positions once, then gathers (three boolean-mask selections are slower)
                where = torch.from_numpy(np.flatnonzero((cands.keys >> _SHIFT).numpy() == b))
                found = tuple(x.index_select(0, where) for x in found)
            self._bins[b] = found
        return self._bins[b]

    def _candidate_pass(self, lo: int, hi: int) -> _CandidatePass:
        """This rank's entries in level-1 bins lo..hi as (key, global index, unit), int64, in index order.

        The same pass keeps, for `selected`, the entries above bin hi in the units that may still end up sparse:
        those not yet switched with every bin above hi taken (switching is monotone in the picks). They have
        fewer picks than their switch point, so these lists stay small."""
        maybe_sparse = (~self.costs.switched(self.at_edge[:, hi + 1])).tolist()
        low, top = lo << _SHIFT, ((hi + 1) << _SHIFT) - 1  # candidate keys: low <= key <= top
        width = np.uint32(top - low)
        has_above = (self._highest > top).tolist()
        # A chunk whose keys span the bins may still hold none in them (rarely): the scan then finds nothing.
        has_range = ((self._highest >= low) & (self._lowest <= top)).tolist()
        keys, index, unit, above = [], [], [], []
        for n, (seg, i, part) in enumerate(self._chunk_keys()):
            first = seg.gstart + i
            values = part.numpy()
            if maybe_sparse[seg.unit] and has_above[n]:
                where = np.flatnonzero(values >= low)
                found = values[where]
                in_range = found <= top
                above.append((seg.unit, torch.from_numpy(where[~in_range] + first)))
                where, found = where[in_range], found[in_range]
            elif has_range[n]:
                # low <= key <= top as one unsigned comparison (keys are non-negative: no overflow)
                where = np.flatnonzero((values - np.int32(low)).view(np.uint32) <= width)
                found = values[where]
            else:
                continue
            keys.append(torch.from_numpy(found.astype(np.int64)))
            index.append(torch.from_numpy(where + first))
            unit.append(torch.full((where.size,), seg.unit, dtype=torch.int64))
        empty = torch.zeros(0, dtype=torch.int64)
        return _CandidatePass(lo, hi, *(torch.cat(x) if x else empty for x in (keys, index, unit)), maybe_sparse,
                              above)

    def _unit_histogram(self, key: int, shift: int, keys: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
        """[units, 1024] global counts of (unit, next 10 key bits) of the candidates whose key starts with `key`
        (collective; the cut at a step further usually lies under the same prefix, so each is reduced once)."""
        if (key, shift) not in self._histograms:
            flat = torch.bincount(unit * (_SUB_MASK + 1) + ((keys >> shift) & _SUB_MASK),
                                  minlength=self.units * (_SUB_MASK + 1))
            self._histograms[key, shift] = all_reduce_(flat.view(self.units, _SUB_MASK + 1))
        return self._histograms[key, shift]

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
        b = self._bin_of(limit)
        keys, index, unit = self._in_bin(b)
        base, key = self.at_edge[:, b + 1], b
        # Levels 2 and 3: the same on the candidates, 10 key bits at a time, down to the exact key.
        for shift in (_SUB_BITS, 0):
            hist = self._unit_histogram(key, shift, keys, unit)
            s, base = self._boundary(hist, base, limit)
            keep = ((keys >> shift) & _SUB_MASK) == s
            keys, index, unit, key = keys[keep], index[keep], unit[keep], (key << _SUB_BITS) | s
        # Entries with a key above `key` fit (base); all of those tied at it do not. The candidates are in
        # global index order (so are the segments), hence so are the ties.
        ties = int(hist[:, s].sum())
        last = (self._last_fitting_tie_gathered(index, unit, ties, base, limit) if ties <= _GATHERED_TIES
                else self._last_fitting_tie(index, unit, base, limit))
        picks = base + all_reduce_(torch.bincount(unit[: int(torch.searchsorted(index, last, side="right"))],
                                                  minlength=self.units))
        return Cut(key, last, picks, int(self.costs.total(picks)))

    def _last_fitting_tie_gathered(self, index: torch.Tensor, unit: torch.Tensor, ties: int, base: torch.Tensor,
                                   limit: int) -> int:
        """The largest global index i such that the tied entries with index <= i fit (cost <= limit) on top of
        `base`, from every rank's ties gathered (one collective; `ties` of them in all)."""
        mine = torch.full((ties, 2), -1, dtype=torch.int64)
        mine[: index.numel(), 0], mine[: index.numel(), 1] = index, unit
        everyone = torch.cat(all_gather_tensor(mine))
        everyone = everyone[everyone[:, 0] >= 0]
        everyone = everyone[torch.argsort(everyone[:, 0])]
        taken, over = 0, ties  # taking `taken` fits, taking `over` does not (taking all of them does not)
        while over - taken > 1:
            mid = (taken + over) // 2
            picks = base + torch.bincount(everyone[:mid, 1], minlength=self.units)
            taken, over = (mid, over) if int(self.costs.total(picks)) <= limit else (taken, mid)
        return int(everyone[taken, 0]) - 1  # just below the first tie that does not fit

    def _last_fitting_tie(self, index: torch.Tensor, unit: torch.Tensor, base: torch.Tensor, limit: int) -> int:
        """The same by bisection over the global index, when the ties are too many to gather: each probe
        all-reduces one count per unit."""
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
        return lo

    def _next_unit(self, cut: Cut) -> int:
        """The unit of the first entry after the cut, over all ranks (collective). It lies in the bin searched
        last (taking that whole bin did not fit), whose candidates are cached."""
        best = torch.tensor([-1, -1, -1], dtype=torch.int64)  # (key, -index, unit): max wins
        keys, index, unit = self._in_bin(cut.key >> _SHIFT)
        after = (keys < cut.key) | ((keys == cut.key) & (index > cut.index))
        if after.any():
            top = keys[after].max()
            first = index[after & (keys == top)].min()
            best = torch.tensor([int(top), -int(first), int(unit[index == first][0])])
        return int(max(all_gather_tensor(best), key=lambda t: (int(t[0]), int(t[1])))[2])

    def closest_to(self, target: int) -> Cut:
        """The cut whose cost is closest to target; ties go to the larger τ (SPEC 2)."""
        if int(self.edge_cost[_BINS]) <= target < int(self.edge_cost[0]):
            # One candidate pass for both cuts that may be needed: the one at target and the one a step further,
            # which costs at most max_step more, when the bins between them are few.
            hi = self._bin_of(target)
            lo = self._bin_of(min(target + self.costs.max_step(), int(self.edge_cost[0]) - 1))
            if self._population(lo, hi) > _SPREAD * self._population(hi, hi):
                lo = hi
            self._passes.append(self._candidate_pass(lo, hi))
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
        cands = self._pass_for(cut.key >> _SHIFT)
        assert all(cands.maybe_sparse[u] for u in units), "a unit switched above the cut's bins cannot be sparse"
        out = [(u, where) for u, where in cands.above if u in units and where.numel()]
        # candidates: every entry of the pass's bins, those above the cut's bin included
        taken = (cands.keys > cut.key) | ((cands.keys == cut.key) & (cands.index <= cut.index))
        unit, index = cands.unit[taken], cands.index[taken]
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
