"""spt_dist as a library: score -> allocate -> get_peft_model, from a researcher's own training loop.

    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10)
    scores = spt_dist.score(model, calibration_batches, method="spt")   # [(images, labels), ...]
    allocation = spt_dist.allocate(scores, budget=0.01, structured="lora")
    peft = spt_dist.get_peft_model(model, allocation)
    peft.print_trainable_parameters()
    ...                                                                  # any loop: plain, Accelerate, Lightning
    peft.save_pretrained("out/peft")                                     # small: what trained, and its structure
    plain = peft.merge_and_unload()                                      # a plain timm model again

Every step works in one process without torch.distributed, and under a process group (torchrun) with the same
result on any world size: `score` reduces each batch's gradient over the ranks (or runs the model through
DeepSpeed ZeRO 0-3 / FSDP2 with `engine=`, each rank scoring its own shard), `allocate` finds the threshold
from all-reduced counts, and every rank gets the whole allocation. The command line (`launch/train.py`) runs
the same functions underneath.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from spt_dist.config import EngineConfig, MethodConfig, OptimConfig, SelectionConfig
from spt_dist.distributed import all_reduce_, broadcast_object, rank, world_size
from spt_dist.engines import ENGINE_SETTINGS
from spt_dist.errors import UserError
from spt_dist.methods import get_method
from spt_dist.peft.allocated import apply_allocation, record_base_fingerprint
from spt_dist.peft.artifact import load_pretrained, read_config, save_pretrained
from spt_dist.peft.baselines import apply_method, format_trainable_parameters, trainable_parameters
from spt_dist.peft.tuned import SPARSE_MODES, Tuned
from spt_dist.selection.allocation import Allocation, allocate_gps, allocate_spt
from spt_dist.selection.layout import Layout
from spt_dist.selection.scores import LocalScores, check_coverage
from spt_dist.selection.scoring import (
    accumulate_scores, build_score_engine, global_batch_step, score_loss_fn, scored_layout,
)

@dataclass
class Scores:
    """Sensitivity scores of one model: this rank's share of every scored entry (all of them in one process)."""

    method: str  # spt | gps
    layout: Layout
    local: LocalScores

    def full(self) -> dict[str, torch.Tensor]:
        """Every scored tensor's scores, shaped like the parameter (one process only)."""
        if world_size() > 1:
            raise UserError("Scores.full: every rank holds a share of the scores; call it in one process")
        out = {t.name: torch.empty(t.numel) for t in self.layout.tensors}
        for chunk in self.local.chunks:
            out[chunk.tensor][chunk.start : chunk.start + chunk.values.numel()] = chunk.values
        return {t.name: out[t.name].view(t.shape) for t in self.layout.tensors}


_BATCH_FORM = "(images, labels) pairs, {'images', 'labels'} dicts, or lists of them (micro-batches)"


def _as_batch(item) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(item, dict) and torch.is_tensor(item.get("images")) and torch.is_tensor(item.get("labels")):
        images, labels = item["images"], item["labels"]
    elif isinstance(item, (tuple, list)) and len(item) == 2 and all(torch.is_tensor(x) for x in item):
        images, labels = item
    else:
        raise UserError(f"score: batches must be {_BATCH_FORM} (got {type(item).__name__})")
    # An empty batch has no gradient to score (its mean loss is NaN, or 0 for a custom loss): all-zero or NaN
    # scores would then allocate as if they meant something.
    if images.dim() == 0 or len(images) == 0:
        raise UserError(f"score: a batch of {tuple(images.shape)} images: every batch needs at least one image")
    return images, labels


def _micro_batches(item) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One batch of `batches`: an (images, labels) pair or dict, or a list of them (micro-batches whose mean
    gradient is the batch's, as with gradient accumulation)."""
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], (dict, tuple, list)):
        return [_as_batch(micro) for micro in item]
    return [_as_batch(item)]


def _check_model(model) -> None:
    if not isinstance(model, nn.Module) or not callable(getattr(model, "get_classifier", None)):
        raise UserError("spt_dist needs a timm-style model (an nn.Module with get_classifier(), e.g. from "
                        f"timm.create_model), got {type(model).__name__}")


def _loss_fn(method: str, loss, temperature: float, views: int):
    if callable(loss):
        def custom(out, labels):
            value = loss(out, labels)
            if not torch.is_tensor(value) or value.numel() != 1:
                raise UserError(f"score: the loss function must return a scalar tensor (got {type(value).__name__})")
            return value, value.item()
        return custom
    if loss not in ("ce", "supcon"):
        raise UserError(f"score: loss must be 'ce', 'supcon' or a function (got {loss!r})")
    return score_loss_fn(SelectionConfig(method=method, loss=loss, temperature=temperature), views, world_size())


def score(model: nn.Module, batches: Iterable, method: str = "spt", loss: str | Callable = "ce", *,
          engine: str | EngineConfig | None = None, views: int = 1, temperature: float = 0.07,
          device: torch.device | str | None = None) -> Scores:
    """Sensitivity scores (SPEC 2-3): s = Σ_b g_b² (SPT) or |Σ_b g_b| (GPS), g_b the gradient of batch b's loss.

    `batches`: (images, labels) pairs or {"images", "labels"} dicts: each a whole batch in one process, this
    rank's equal share of it under a process group; or lists of them, micro-batches of equal size whose mean
    gradient is the batch's (gradient accumulation). `loss`: 'ce' (cross-entropy of the model's output),
    'supcon' (supervised contrastive on the model's output features, e.g. a timm model with num_classes=0;
    each batch holds `views` views of its images, view-major; GPS's own loss, SPEC 3, and the command line's
    default for GPS) or a function (output, labels) -> loss.
    The model is scored as it is (call `.train()` or `.eval()` first as you wish; SPEC 2 scores in train mode
    without drop-path). Only the scored tensors are made trainable; nothing is updated.

    `engine`: 'zero0'..'zero3', 'fsdp2' or an EngineConfig: the model goes through that engine, each rank
    keeps the scores of its own shard and no gradient is gathered. The engine takes the model over (ZeRO-3 and
    FSDP2 shard it): score a model built for the purpose, and build the one to train again (same seed).
    """
    if method not in ("spt", "gps"):
        raise UserError(f"score: method must be 'spt' or 'gps' (got {method!r})")
    _check_model(model)
    if loss == "supcon" and getattr(model, "num_classes", 0):
        raise UserError("score: loss 'supcon' scores the CLS features (SPEC 3): build the model with num_classes=0")
    if engine is not None and not torch.distributed.is_initialized():
        raise UserError("score: engine= needs a process group (start the script with torchrun); in one process "
                        "leave it out")
    layout = scored_layout(model, method)
    loss_fn = _loss_fn(method, loss, temperature, views)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    scores = LocalScores()
    if engine is None:
        if not _score_plain(model, layout, batches, loss_fn, method, device, scores):
            raise UserError("score: no batches")
    else:
        engine_cfg = EngineConfig(**ENGINE_SETTINGS[engine]) if isinstance(engine, str) and engine in ENGINE_SETTINGS \
            else engine
        if not isinstance(engine_cfg, EngineConfig):
            raise UserError(f"score: engine must be one of {', '.join(ENGINE_SETTINGS)} or an EngineConfig "
                            f"(got {engine!r})")
        iterator = iter(batches)
        first = next(iterator, None)
        if first is None:
            raise UserError("score: no batches")
        micro_batches = _micro_batches(first)
        wrapped = build_score_engine(model, engine_cfg, OptimConfig(), len(micro_batches[0][1]),
                                     len(micro_batches), device)
        for item in itertools.chain([first], iterator):
            micro = [{"images": images, "labels": labels} for images, labels in _micro_batches(item)]
            global_batch_step(wrapped, micro, loss_fn, device, lambda: accumulate_scores(wrapped, scores, method))
    scores.finish(absolute=method == "gps")
    check_coverage(scores, layout)
    return Scores(method, layout, scores)


def _score_plain(model: nn.Module, layout: Layout, batches: Iterable, loss_fn, method: str, device, scores) -> int:
    """Without an engine: each batch's gradient (averaged over the ranks, as DDP would), of which each rank
    keeps an equal flat slice of every scored tensor, so the ranks' scores cover every entry once."""
    named = dict(model.named_parameters())
    params = [named[t.name] for t in layout.tensors]
    world, me = world_size(), rank()
    count = 0
    for count, item in enumerate(batches, 1):
        micro_batches = _micro_batches(item)
        for p in params:
            p.grad = None
        for images, labels in micro_batches:
            value, _ = loss_fn(model(images.to(device)), labels.to(device))
            (value / len(micro_batches)).backward()
        for t, p in zip(layout.tensors, params):
            grad = p.grad.detach().reshape(-1).float()
            if world > 1:
                grad = all_reduce_(grad.clone()) / world
            size = math.ceil(t.numel / world)
            start = min(me * size, t.numel)
            scores.add_gradient(t.name, start, grad[start : start + size], square=method == "spt")
    for p in params:
        p.grad = None
    return count


def allocate(scores: Scores, budget: float | None = None, *, k: int | None = None, structured: str = "lora",
             module_rank: int = 8, alpha: float = 10.0, beta: float = 5.0) -> Allocation:
    """The allocation of `scores` (SPEC 2-3), complete on every rank.

    SPT: `budget` (a parameter count, or a fraction of the backbone below 1); `structured` 'lora', 'adapter'
    or 'none'; LoRA/Adapter rank, α and β. GPS: `k` inputs per output row. `Allocation.save(dir)` writes the
    files `--stage select` writes; `Allocation.load(dir)` reads them."""
    if not isinstance(scores, Scores):
        raise UserError(f"allocate: expected the Scores of spt_dist.score (got {type(scores).__name__})")
    number = (int, float)
    if scores.method == "spt":
        if budget is None or k is not None:
            raise UserError("allocate: SPT takes a budget (a parameter count, or a fraction of the backbone), not k")
        if isinstance(budget, bool) or not isinstance(budget, number):
            raise UserError(f"allocate: budget must be a number (got {budget!r})")
        if structured not in ("lora", "adapter", "none"):
            raise UserError(f"allocate: structured must be 'lora', 'adapter' or 'none' (got {structured!r})")
        if type(module_rank) is not int or not all(isinstance(x, number) for x in (alpha, beta)):
            raise UserError("allocate: module_rank must be a whole number, alpha and beta numbers")
        sel = SelectionConfig(method="spt", budget=budget, structured=structured, module_rank=module_rank,
                              alpha=alpha, beta=beta)
    else:
        if budget is not None:
            raise UserError("allocate: GPS takes k (inputs per output row), not a budget")
        k = 1 if k is None else k
        if type(k) is not int:
            raise UserError(f"allocate: k must be a whole number (got {k!r})")
        sel = SelectionConfig(method="gps", k=k)
    sel.validate()
    allocation = (allocate_spt if scores.method == "spt" else allocate_gps)(scores.local, scores.layout, sel)
    allocation.indices = broadcast_object(allocation.indices)  # budget-sized; rank 0 had them all
    return allocation


class PeftModel(nn.Module):
    """A model with what an allocation (or a baseline: full, linear, lora) trains; the rest frozen."""

    def __init__(self, model: nn.Module, method: str) -> None:
        super().__init__()
        self.base_model = model
        self.method = method

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str):
        """Attributes the base model has (get_classifier, no_weight_decay, pretrained_cfg...), as HF PEFT."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_model"), name)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        return trainable_parameters(self.base_model)

    def print_trainable_parameters(self) -> None:
        print(format_trainable_parameters(self.base_model))

    def save_pretrained(self, directory: str) -> None:
        """The artifact: what trains (deltas and their indices, LoRA/Adapter, vectors, head) and the structure.
        The frozen base is not in it: load it back onto the same base model with `from_pretrained`."""
        model = self.base_model
        save_pretrained(directory, model, model.state_dict(), dict(
            model=model.pretrained_cfg.get("architecture") if hasattr(model, "pretrained_cfg") else None,
            num_classes=getattr(model, "num_classes", None), img_size=None, checkpoint=None, seed=None,
            method=self.method))

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str, *, allow_other_base: bool = False) -> "PeftModel":
        """`model` (the base the artifact was trained from) with the artifact applied. Other base weights than
        the artifact's (its recorded fingerprint) are refused, untouched, unless `allow_other_base=True`."""
        model = load_pretrained(directory, model, allow_other_base=allow_other_base)
        return cls(model, read_config(directory).get("method") or "peft")

    def merge_and_unload(self) -> nn.Module:
        """The base model with every delta and LoRA product folded into its weights, as plain layers (Adapters
        cannot be folded: sequential and non-linear)."""
        model = self.base_model
        tuned = [(path, m) for path, m in model.named_modules() if isinstance(m, Tuned)]
        for path, module in tuned:  # before changing anything: never leave a half-merged model
            if module.adapters:
                raise UserError(f"merge: '{path}' has Adapters: sequential and non-linear, they cannot be merged "
                                "into the weights")
        for path, module in tuned:
            parent, _, leaf = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, module.unwrap())
        return model


def get_peft_model(model: nn.Module, how: Allocation | str | MethodConfig, *, sparse_update: str = "delta",
                   dropout: float = 0.0, drop_path: float = 0.0, lora_rank: int = 8) -> PeftModel:
    """`model` with the trainable structure of an allocation (SPT: sparse deltas, LoRA/Adapter modules, full
    vectors, cls_token; GPS: per-row deltas, Linear/conv biases; both: the head), or of a baseline ('full',
    'linear', 'lora' on q and v, or a MethodConfig). `dropout` / `drop_path`: on the modules' input / output.
    Weight decay: SPEC 2 decays 2-D weights only, never sparse entries; `spt_dist.optim.param_groups(
    peft.base_model, wd)` gives those groups (with sparse_update='dense_masked' a decaying optimizer over the
    whole tensors would move entries that must stay frozen)."""
    _check_model(model)
    if isinstance(how, Allocation):
        for name, value in (("dropout", dropout), ("drop_path", drop_path)):
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise UserError(f"get_peft_model: {name} must be in [0, 1) (got {value!r})")
        if sparse_update not in SPARSE_MODES:
            raise UserError(f"get_peft_model: sparse_update must be one of {', '.join(SPARSE_MODES)} "
                            f"(got {sparse_update!r})")
        apply_allocation(model, how.record, how.indices, sparse_update=sparse_update, dropout=dropout,
                         drop_path=drop_path)
        return PeftModel(model, how.method)
    if not isinstance(how, (str, MethodConfig)):
        raise UserError(f"get_peft_model: give an Allocation, a method name or a MethodConfig (got {how!r})")
    cfg = how if isinstance(how, MethodConfig) else MethodConfig(name=how, lora_rank=lora_rank, lora_dropout=dropout,
                                                                 module_drop_path=drop_path)
    cfg.validate()
    if get_method(cfg.name).selects:
        raise UserError(f"get_peft_model: {cfg.name!r} trains an allocation: get_peft_model(model, "
                        "allocate(score(...), ...))")
    model = apply_method(model, cfg)
    record_base_fingerprint(model)  # of the base while it is whole: save_pretrained writes it
    return PeftModel(model, cfg.name)
