"""Run under torchrun: the engine's world-size independent state (full trainable weights, full AdamW state, step
count, schedule) restores training exactly, as a checkpoint uses it.

Engine A takes 2 steps, its state is taken, it takes a 3rd; engine B is built from a fresh model (the frozen
weights from the same seed, as a resumed run makes them; the trainable ones scrambled) given A's trainable weights
before wrapping, loads the optimizer state and schedule and takes the same 3rd step.
Weights after it must be bit-identical. Writes OUT/result-rank{r}.json.

usage: torchrun --nproc_per_node 2 tests/workers/engine_checkpoint.py OUTDIR key=value ...
"""

import json
import os
import sys

import torch
import torch.nn.functional as F

from spt_dist.config import load_config
from spt_dist.distributed import broadcast_object, init_distributed, shutdown_distributed
from spt_dist.engines import EngineSpec, build_engine
from spt_dist.models import create_model
from spt_dist.optim import build_scheduler
from spt_dist.peft.baselines import apply_method


def build(cfg, info, weights=None, scrambled=None):
    torch.manual_seed(0)
    model = apply_method(create_model(cfg.model.name, 4), cfg.method)
    if weights is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.normal_()
                    scrambled[name] = p.detach().clone()
        model.load_state_dict(weights, strict=False)
    spec = EngineSpec(engine=cfg.engine, optim=cfg.optim, micro_batch_size=cfg.data.batch_size, device=info.device,
                      scheduler=lambda opt: build_scheduler(opt, cfg.optim, total_steps=10, warmup_steps=2))
    return build_engine(model, spec)


def train_step(engine, accum, images, labels):
    for _ in range(accum):
        engine.backward(F.cross_entropy(engine.module(images.to(engine.input_dtype)).float(), labels))
        engine.step()


def main() -> None:
    out, overrides = sys.argv[1], sys.argv[2:]
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml"), overrides)
    accum = cfg.optim.grad_accum
    info = init_distributed(cfg.engine.timeout_s)
    gen = torch.Generator().manual_seed(100 + info.rank)
    batches = [(torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 4, (8,), generator=gen)) for _ in range(3)]

    a = build(cfg, info)
    for images, labels in batches[:2]:
        train_step(a, accum, images, labels)
    weights = a.full_state_dict(trainable_only=True)
    optimizer, steps = a.optimizer_state()
    schedule = a.scheduler().state_dict()
    optimizer, steps = broadcast_object((optimizer, steps))  # complete on rank 0; a checkpoint file for all
    train_step(a, accum, *batches[2])
    expected, lr_a = a.full_state_dict(), a.lr()

    fresh = {}
    b = build(cfg, info, weights=weights, scrambled=fresh)
    b.load_optimizer_state(optimizer, steps)
    b.load_scheduler_state(schedule)
    train_step(b, accum, *batches[2])
    got, lr_b = b.full_state_dict(), b.lr()

    result = {"rank": info.rank, "lr": [lr_a, lr_b],
              "differs_before_load": [n for n in fresh if not torch.equal(fresh[n], expected[n])],
              "mismatched": [n for n in expected if not torch.equal(got[n], expected[n])]}
    with open(os.path.join(out, f"result-rank{info.rank}.json"), "w") as f:
        json.dump(result, f)
    shutdown_distributed()


if __name__ == "__main__":
    main()
