"""What a run will need before it runs: parameters, budget, memory per rank and FLOPs, from the config alone.

    python -m spt_dist.plan --config configs/backbones/vit_h14.yaml --config configs/methods/spt_lora.yaml \
        --world-size 8,16 data.num_classes=100

The model is built on the meta device (a ViT-g in about a second, no memory). Memory per rank counts the
model states only (weights, fp32 master copies, gradients, AdamW's two moments, SPT/GPS scores), as the ZeRO
paper does; activations come on top and depend on the batch. Trainable counts of SPT/GPS are the budget's
target (the allocation lands within a module of it) plus what always trains (head; GPS: Linear/conv biases).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from spt_dist.cli import command
from spt_dist.config import Config, load_config
from spt_dist.errors import UserError
from spt_dist.methods import get_method

GIB = 2**30


@dataclass(frozen=True)
class Plan:
    world_size: int
    total_params: int  # with the head, before any module is added
    backbone_params: int
    scored_params: int  # what the score pass scores (SPT/GPS), else 0
    trainable_params: int
    forward_flops: float  # per image
    train_flops: float  # per image
    weights_gib: float  # per rank, in the run's precision (frozen and trainable)
    trainable_state_gib: float  # per rank: fp32 master copies (bf16 runs), gradients, AdamW moments
    score_pass_gib: float  # per rank during the score pass (fp32 weights, gradients of scored tensors, scores)

    @property
    def train_gib(self) -> float:
        return self.weights_gib + self.trainable_state_gib


def _sharded(engine, what: str) -> bool:
    """Whether ZeRO/FSDP splits `what` (weights | gradients | optimizer) over the ranks."""
    if engine.kind == "fsdp":
        return True
    return engine.zero_stage >= {"optimizer": 1, "gradients": 2, "weights": 3}[what]


def _trainable(cfg: Config, model, layout) -> int:
    from spt_dist.peft.baselines import apply_method, trainable_parameters  # noqa: PLC0415
    from spt_dist.selection.spt_allocation import target_cost  # noqa: PLC0415

    head = sum(p.numel() for p in model.get_classifier().parameters())
    selection = get_method(cfg.method.name).selection
    if selection == "spt":
        return target_cost(cfg.selection.budget, layout) + head
    if selection == "gps":
        return sum(u.rows * cfg.selection.k for u in layout.units) + layout.fixed_full_params + head
    return trainable_parameters(apply_method(model, cfg.method))[0]


def make_plan(cfg: Config, world_size: int, num_classes: int) -> Plan:
    from spt_dist.flops import count_flops  # noqa: PLC0415 - torch and timm only here
    from spt_dist.models import create_model  # noqa: PLC0415
    from spt_dist.selection.layout import build_layout  # noqa: PLC0415

    model = create_model(cfg.model.name, num_classes, img_size=cfg.model.img_size, device="meta")
    total = sum(p.numel() for p in model.parameters())
    layout = build_layout(model, cfg.selection.method)
    selects = get_method(cfg.method.name).selects
    trainable = _trainable(cfg, model, layout)
    flops = count_flops(cfg.model.name, num_classes, cfg.method.name, cfg.model.img_size)
    engine, bf16 = cfg.engine, cfg.engine.precision == "bf16"

    def per_rank(count: float, what: str) -> float:
        return count / world_size if _sharded(engine, what) else count

    weights = per_rank(total * (2 if bf16 else 4), "weights")
    state = per_rank(trainable * 4, "gradients") + per_rank(trainable * 8 + (trainable * 4 if bf16 else 0), "optimizer")
    scored = layout.scored_params if selects else 0
    # The score pass runs in fp32 with the scored tensors trainable; each rank keeps scores for its own shard.
    score_pass = per_rank(total * 4, "weights") + per_rank(scored * 4, "gradients") + scored * 4 / world_size
    return Plan(world_size, total, layout.backbone_params, scored, trainable, flops.forward, flops.train,
                weights / GIB, state / GIB, (score_pass if selects else 0) / GIB)


def format_plans(cfg: Config, plans: list[Plan]) -> str:
    first = plans[0]
    engine = cfg.engine.kind + (f" ZeRO-{cfg.engine.zero_stage}" if cfg.engine.kind == "deepspeed" else "")
    lines = [f"{cfg.model.name} / {cfg.method.name} / {engine} / {cfg.engine.precision}",
             f"parameters {first.total_params:,} (backbone {first.backbone_params:,}); trainable "
             f"{first.trainable_params:,} ({100 * first.trainable_params / first.total_params:.3f}%)"
             + (f"; scored {first.scored_params:,}" if first.scored_params else ""),
             f"FLOPs per image: forward {first.forward_flops / 1e9:.1f} G, training step {first.train_flops / 1e9:.1f} G",
             "",
             f"{'ranks':>6} {'weights':>10} {'trainable state':>16} {'training':>10} {'score pass':>11}   (GiB per rank)"]
    for p in plans:
        score = f"{p.score_pass_gib:11.2f}" if p.scored_params else f"{'-':>11}"
        lines.append(f"{p.world_size:>6} {p.weights_gib:10.2f} {p.trainable_state_gib:16.3f} {p.train_gib:10.2f} {score}")
    return "\n".join(lines)


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spt-plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", metavar="YAML", help="run config(s), as for launch/train.py")
    parser.add_argument("--world-size", default="1,8,16,64", help="comma-separated rank counts (default 1,8,16,64)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    try:
        world_sizes = [int(w) for w in args.world_size.split(",")]
    except ValueError:
        world_sizes = [0]
    if any(w < 1 for w in world_sizes):
        raise UserError(f"--world-size: comma-separated whole numbers >= 1, e.g. 8,16 (got {args.world_size!r})")
    num_classes = cfg.data.num_classes
    if num_classes is None:  # the task's class count, else a placeholder: the head is small next to the rest
        from spt_dist.data.benchmarks import find_task  # noqa: PLC0415
        found = find_task(cfg.data.task) if cfg.data.task else None
        num_classes = found[1].classes if found else 1000
    print(format_plans(cfg, [make_plan(cfg, w, num_classes) for w in world_sizes]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
