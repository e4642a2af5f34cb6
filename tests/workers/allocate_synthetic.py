"""Runs the distributed allocations on synthetic scores with many exact ties, split unevenly over the ranks.

Every rank builds the same scores (seeded), keeps its own pieces (cut at arbitrary offsets, so ZeRO-like
splits through rows and units), and runs SPT for several budgets and GPS; rank 0 writes the results.
Usage: allocate_synthetic.py OUT_JSON
"""

import json
import sys

import torch

from spt_dist.config import SelectionConfig
from spt_dist.distributed import init_distributed, shutdown_distributed
from spt_dist.models import create_model
from spt_dist.selection import spt_allocation
from spt_dist.selection.allocation import allocate
from spt_dist.selection.layout import build_layout
from spt_dist.selection.scores import Chunk, LocalScores, check_coverage

BUDGETS = [1, 500, 3000, 15597, 0.05, 0.3, 0.8]  # 15597: the cut one step further lies in a lower level-1 bin
# The SPT search's other paths, for the same answers: ties at the cut found by bisection over the global index
# (rather than gathered), and one candidate pass per level-1 bin (rather than one for both cuts).
OTHER_PATHS = {"_GATHERED_TIES": 0, "_SPREAD": -1}


def synthetic_scores(numel: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Few distinct values: ties everywhere, also at the threshold; some exact zeros.
    return torch.randint(0, 300, (numel,), generator=g).float().pow(2) * 1e-4


def my_pieces(layout, rank: int, world: int, seed: int) -> LocalScores:
    g = torch.Generator().manual_seed(seed + 1)
    scores = LocalScores()
    piece = 0
    for t in layout.tensors:
        values = synthetic_scores(t.numel, seed + t.offset)
        cuts = sorted(set(torch.randint(1, t.numel, (3,), generator=g).tolist())) if t.numel > 4 else []
        for start, stop in zip([0, *cuts], [*cuts, t.numel]):
            if piece % world == rank:
                scores.chunks.append(Chunk(t.name, start, values[start:stop].clone()))
            piece += 1
    return scores


def main() -> None:
    out = sys.argv[1]
    info = init_distributed(60)
    model = create_model("vit_test_tiny_patch8_32", 10, device="meta")
    results = {}
    for method in ("spt", "gps"):
        layout = build_layout(model, method)
        scores = my_pieces(layout, info.rank, info.world_size, seed=7)
        check_coverage(scores, layout)
        runs = [dict(budget=b) for b in BUDGETS] if method == "spt" else [dict(k=1), dict(k=3)]
        runs += [dict(budget=3000, structured="adapter"), dict(budget=3000, structured="none")] if method == "spt" else []
        for settings in runs:
            allocation = allocate(scores, layout, SelectionConfig(method=method, **settings))
            key = f"{method}-" + "-".join(f"{k}={v}" for k, v in settings.items())
            results[key] = {"record": allocation.record,
                            "indices": {n: v.tolist() for n, v in allocation.indices.items()}}
            if method == "spt":
                defaults = {name: getattr(spt_allocation, name) for name in OTHER_PATHS}
                for name, value in OTHER_PATHS.items():
                    setattr(spt_allocation, name, value)
                other = allocate(scores, layout, SelectionConfig(method=method, **settings))
                for name, value in defaults.items():
                    setattr(spt_allocation, name, value)
                results[key + "-other-paths"] = {"record": other.record,
                                                 "indices": {n: v.tolist() for n, v in other.indices.items()}}
    if info.is_main:
        with open(out, "w") as f:
            json.dump(results, f)
    shutdown_distributed()


if __name__ == "__main__":
    main()
