"""The library's score -> allocate on this job's ranks, on the calibration batches the command line reads.

Usage: api_select.py CONFIG_JSON OUT_DIR ENGINE...   (ENGINE: plain | zero0..zero3 | fsdp2)
For each ENGINE a freshly built model (the score pass's seed) is scored through `spt_dist.score` (plain: each
batch's gradient averaged over the ranks, no engine) and allocated by `spt_dist.allocate`; rank 0 saves each
allocation to OUT_DIR/ENGINE. CONFIG_JSON: {"config": [...], "overrides": [...]} as for launch/train.py.
"""

import json
import sys

import spt_dist
from spt_dist.config import load_config
from spt_dist.data.dataset import resolve_dataset
from spt_dist.distributed import init_distributed, shutdown_distributed
from spt_dist.selection.scoring import build_score_model
from api_calibration import calibration_batches  # beside this script


def main() -> None:
    spec, out, engines = json.loads(open(sys.argv[1]).read()), sys.argv[2], sys.argv[3:]
    info = init_distributed(120)
    cfg = load_config(spec["config"], spec["overrides"])
    data = resolve_dataset(cfg.data)
    sel = cfg.selection
    for engine in engines:
        model = build_score_model(cfg, data.num_classes)
        batches = calibration_batches(cfg, data, model, info.rank, info.world_size)
        scores = spt_dist.score(model, batches, method=sel.method, loss=sel.score_loss,
                                engine=None if engine == "plain" else engine)
        settings = dict(budget=sel.budget, structured=sel.structured) if sel.method == "spt" else dict(k=sel.k)
        allocation = spt_dist.allocate(scores, **settings)
        if info.is_main:
            allocation.save(f"{out}/{engine}")
    shutdown_distributed()


if __name__ == "__main__":
    main()
