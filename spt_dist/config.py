"""Typed run configuration: YAML file + dotted `key=value` overrides, validated on load.

One dataclass per section. Loading checks every key against the schema (unknown keys, wrong types and
impossible values are rejected with a one-line `UserError` naming the key), so a typo fails before any
process group or model exists. The resolved config is written into the run directory.
"""

from __future__ import annotations

import dataclasses
import math
import os
import reprlib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin

import yaml

from spt_dist.atomic import write_text
from spt_dist.data.benchmarks import SUITES, find_task
from spt_dist.data.shards import MAX_IMAGE_PIXELS, MAX_MEMBER_MB
from spt_dist.errors import UserError
from spt_dist.methods import get_method


@dataclass
class ModelConfig:
    name: str = "vit_test_tiny_patch8_32"
    checkpoint: str | None = None  # local weights file (.safetensors / .pth); nothing is downloaded
    img_size: int | None = None  # None: the model's default resolution
    drop_path_rate: float = 0.0

    def validate(self) -> None:
        _check(self.img_size is None or self.img_size > 0, "model.img_size", self.img_size, "must be > 0")
        _check(0.0 <= self.drop_path_rate < 1.0, "model.drop_path_rate", self.drop_path_rate, "must be in [0, 1)")
        if self.checkpoint is not None and not os.path.isfile(self.checkpoint):
            raise UserError(f"model.checkpoint: no such file '{self.checkpoint}'")


@dataclass
class DataConfig:
    # Shard patterns (brace ranges, globs, comma lists). None: the benchmark task's shards under `root` (see
    # `task`), or without a task the built-in demo's synthetic set.
    train_shards: str | None = None
    eval_shards: str | None = None
    root: str = "data/benchmarks"  # where `python -m spt_dist.data.shards vtab|fgvc --out <root>/<suite>` wrote
    num_classes: int | None = None  # None: read from classes.json next to the train shards
    train_samples: int | None = None  # None: read from sizes.json next to the train shards
    batch_size: int = 32  # per rank and micro-step
    # The global batch (all ranks, all micro-steps): the papers' recipes fix this one. Set, it decides
    # batch_size = global_batch_size / (ranks x optim.grad_accum) when the run starts.
    global_batch_size: int | None = None
    eval_batch_size: int = 64
    workers: int = 2
    shuffle_buffer: int = 1000
    augment: bool = False  # timm's training augmentation (random resized crop, flip); off: resize only
    crop_pct: float = 1.0
    # Largest tar member read (MB): larger or sparse members (a crafted header may declare any size) are refused
    # unread and their samples counted as bad_image.
    max_member_mb: float = MAX_MEMBER_MB
    # Largest image decoded (pixels, from its header): a larger one is not decoded (a 144 Mpx image is ~0.4 GB as
    # RGB, more while converting, in every loader worker) and its sample counts as bad_image. The default (25 Mpx,
    # spt_dist/data/shards.py says why) is also what the shard tool packs at most.
    max_image_pixels: int = MAX_IMAGE_PIXELS
    # The benchmark task (spt_dist/data/benchmarks.py: vtab/cifar100, ..., fgvc/cub, ...): its shards are read
    # from <root>/<suite>/<task>/ unless train_shards/eval_shards are given, GPS takes its K, and the report
    # puts the run in its column of the papers' results table. Free text for other data sets.
    task: str | None = None

    def resolve(self) -> None:
        """Shard patterns the task (or the demo) implies, where none are given."""
        found = find_task(self.task) if self.task else None
        if self.task and not found and self.train_shards is None:
            raise UserError(f"data.task: '{self.task}' is no benchmark task (vtab/<task> or fgvc/<task>: "
                            "spt_dist/data/benchmarks.py); for another data set give data.train_shards and eval_shards")
        if found:
            suite, task = found
            where = os.path.join(self.root, suite, task.name)
            self.train_shards = self.train_shards or os.path.join(where, "train-*.tar")
            self.eval_shards = self.eval_shards or os.path.join(where, "test-*.tar")
        self.train_shards = self.train_shards or "data/synthetic/train-{000000..000007}.tar"
        self.eval_shards = self.eval_shards or "data/synthetic/test-{000000..000001}.tar"

    def validate(self) -> None:
        known_suite = self.task is not None and self.task.split("/")[0] in SUITES
        _check(not known_suite or find_task(self.task) is not None, "data.task", self.task,
               "unknown task of that suite (spt_dist/data/benchmarks.py lists them)")
        _check(self.global_batch_size is None or self.global_batch_size > 0, "data.global_batch_size",
               self.global_batch_size, "must be > 0")
        for key in ("batch_size", "eval_batch_size"):
            _check(getattr(self, key) > 0, f"data.{key}", getattr(self, key), "must be > 0")
        _check(self.workers >= 0, "data.workers", self.workers, "must be >= 0")
        _check(self.shuffle_buffer >= 1, "data.shuffle_buffer", self.shuffle_buffer, "must be >= 1")
        _check(self.num_classes is None or self.num_classes >= 2, "data.num_classes", self.num_classes, "must be >= 2")
        _check(self.train_samples is None or self.train_samples > 0, "data.train_samples", self.train_samples, "must be > 0")
        _check(0.0 < self.crop_pct <= 1.0, "data.crop_pct", self.crop_pct, "must be in (0, 1]")
        _check(math.isfinite(self.max_member_mb) and self.max_member_mb > 0, "data.max_member_mb", self.max_member_mb,
               "must be a positive number of MB")
        _check(self.max_image_pixels > 0, "data.max_image_pixels", self.max_image_pixels,
               "must be a positive number of pixels")


@dataclass
class MethodConfig:
    # A registered method (spt_dist.methods): full, linear, lora are baselines; spt_lora, spt_adapter, gps train
    # what the allocation of `selection` chose (read from `allocation`, or from this run's directory, made there
    # first if absent).
    name: str = "full"
    allocation: str | None = None  # a run directory holding allocation.json and allocation.safetensors
    # How sparse entries train: delta (a zero-initialised delta on exactly those entries: state and traffic sized
    # by them) or dense_masked (the whole tensor trains with the other entries' gradients zeroed, as the GPS
    # reference does: for comparison).
    sparse_update: Literal["delta", "dense_masked"] = "delta"
    lora_rank: int = 8
    lora_alpha: float | None = None  # None: alpha = rank, i.e. no scaling (the SPT reference's choice)
    lora_dropout: float = 0.0  # on the input of LoRA and Adapter modules
    module_drop_path: float = 0.0  # per-sample drop-path on the output of LoRA and Adapter modules (SPEC 2: 0.1)
    # Matrices that get LoRA; `q`, `k`, `v` are the row blocks of timm's fused qkv Linear (or EVA-02's separate
    # q/k/v projections); fc1_g, fc1_x are EVA-02's SwiGLU matrices; reduction is Swin's patch merging.
    lora_targets: list[str] = field(default_factory=lambda: ["q", "v"])

    def validate(self) -> None:
        get_method(self.name)  # an unknown name fails here, naming the known ones
        _check(self.lora_rank > 0, "method.lora_rank", self.lora_rank, "must be > 0")
        _check(self.allocation is None or get_method(self.name).selects, "method.allocation",
               self.allocation, f"method.name {self.name} trains no allocation")
        _check(0.0 <= self.lora_dropout < 1.0, "method.lora_dropout", self.lora_dropout, "must be in [0, 1)")
        _check(0.0 <= self.module_drop_path < 1.0, "method.module_drop_path", self.module_drop_path,
               "must be in [0, 1)")
        for target in self.lora_targets:
            _check(target in MATRIX_TYPES, "method.lora_targets", target,
                   f"unknown matrix (known: {', '.join(MATRIX_TYPES)})")
        _check(len(self.lora_targets) > 0, "method.lora_targets", self.lora_targets, "must not be empty")


# Every backbone family's matrix types, as spt_dist.backbones.base.all_matrix_types() gives them from the specs
# (tests/test_backbones.py keeps the two equal). Written out because the specs import timm and torch, and the
# configuration is read where neither is needed: the Slurm batch step of every job start, sweep submission.
MATRIX_TYPES = ("q", "k", "v", "proj", "fc1", "fc1_g", "fc1_x", "fc2", "reduction")


@dataclass
class SelectionConfig:
    """Sensitivity scoring and parameter allocation (SPT, GPS): ../shared/SPEC.md sections 2-3."""

    method: Literal["spt", "gps"] | None = None  # None: what method.name selects (spt for baselines)
    # Score pass. SPT: s = sum_b g_b^2 of the CE gradient; GPS: s = |sum_b g_b| of `loss`.
    loss: Literal["ce", "supcon"] | None = None  # None: spt -> ce, gps -> supcon
    temperature: float = 0.07  # supervised contrastive loss
    batch_size: int = 32  # the global calibration batch (all ranks together): fixes what one gradient is
    micro_batch_size: int | None = None  # per rank and micro-step; None: batch_size / world size
    batches: int | None = 16  # calibration batches; None: one pass over the train split (GPS)
    shuffle: bool | None = None  # None: spt -> the first images in shard order, gps -> a seeded shuffle
    augment: bool | None = None  # None: gps -> contrastive views (crop, flip, jitter, grey); spt -> none
    # SPT allocation.
    budget: float = 0.01  # >= 1: a parameter count; < 1: a fraction of the backbone's parameters
    structured: Literal["lora", "adapter", "none"] | None = None  # None: what method.name uses, else lora
    module_rank: int = 8
    alpha: float = 10.0  # a matrix gets the module when picks >= module cost / alpha
    beta: float = 5.0  # a vector is tuned fully when picks >= length / beta
    # GPS allocation: the top-k inputs of every output row of every eligible weight. None: data.task's K (the
    # GPS paper's per-task value), else 1.
    k: int | None = None
    # Score pass: save the partial scores every so many calibration batches (resumable with --resume); 0: off.
    checkpoint_every: int = 0

    def resolved(self, method_name: str = "") -> "SelectionConfig":
        """This selection with unset `method` / `structured` as `method.name` implies (its registration, e.g.
        gps -> GPS, spt_adapter -> Adapters; otherwise SPT with LoRA)."""
        implied = get_method(method_name) if method_name else None
        return dataclasses.replace(
            self, method=self.method or (implied and implied.selection) or "spt",
            structured=self.structured or (implied and implied.structured) or "lora")

    @property
    def score_loss(self) -> str:
        return self.loss or ("supcon" if self.method == "gps" else "ce")

    @property
    def shuffled(self) -> bool:
        return self.method == "gps" if self.shuffle is None else self.shuffle

    @property
    def augmented(self) -> bool:
        return self.method == "gps" if self.augment is None else self.augment

    def validate(self) -> None:
        _check(self.temperature > 0, "selection.temperature", self.temperature, "must be > 0")
        _check(self.batch_size > 0, "selection.batch_size", self.batch_size, "must be > 0")
        _check(self.micro_batch_size is None or self.micro_batch_size > 0, "selection.micro_batch_size",
               self.micro_batch_size, "must be > 0")
        _check(self.batches is None or self.batches > 0, "selection.batches", self.batches, "must be > 0")
        _check(math.isfinite(self.budget) and self.budget > 0, "selection.budget", self.budget,
               "must be > 0 (a count, or a fraction below 1)")
        _check(self.budget < 1 or self.budget == int(self.budget), "selection.budget", self.budget,
               "a count must be a whole number (or give a fraction below 1)")
        _check(self.module_rank > 0, "selection.module_rank", self.module_rank, "must be > 0")
        _check(self.alpha > 0, "selection.alpha", self.alpha, "must be > 0")
        _check(self.beta > 0, "selection.beta", self.beta, "must be > 0")
        _check(self.k is None or self.k > 0, "selection.k", self.k, "must be > 0")
        _check(self.checkpoint_every >= 0, "selection.checkpoint_every", self.checkpoint_every, "must be >= 0")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 1e-4  # on weight matrices only; never on biases, norms, tokens
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    epochs: int = 10
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    warmup_epochs: float = 1.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    grad_accum: int = 1
    grad_clip: float = 0.0  # 0: off. Set explicitly: DeepSpeed's own default would silently clip at 1.0.
    # A non-finite loss on any rank: stop (every rank, before that step's update, nothing saved) or skip (that
    # optimizer step is not taken; the schedule goes on; 10 skipped steps in a row stop the run).
    nonfinite: Literal["stop", "skip"] = "stop"

    def validate(self) -> None:
        _check(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        _check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas", self.betas,
               "must be two numbers in [0, 1)")
        _check(self.eps > 0, "optim.eps", self.eps, "must be > 0")
        _check(self.epochs > 0, "optim.epochs", self.epochs, "must be > 0")
        _check(self.max_steps is None or self.max_steps > 0, "optim.max_steps", self.max_steps, "must be > 0")
        _check(self.warmup_epochs >= 0, "optim.warmup_epochs", self.warmup_epochs, "must be >= 0")
        _check(self.warmup_lr >= 0 and self.min_lr >= 0, "optim.min_lr", self.min_lr, "learning rates must be >= 0")
        _check(self.grad_accum >= 1, "optim.grad_accum", self.grad_accum, "must be >= 1")
        _check(self.grad_clip >= 0, "optim.grad_clip", self.grad_clip, "must be >= 0")


@dataclass
class EngineConfig:
    kind: Literal["deepspeed", "fsdp"] = "deepspeed"
    zero_stage: int = 0  # DeepSpeed only
    precision: Literal["fp32", "bf16"] = "fp32"
    timeout_s: int = 1800  # collective timeout: a dead rank fails the job instead of hanging it forever

    def validate(self) -> None:
        _check(self.zero_stage in (0, 1, 2, 3), "engine.zero_stage", self.zero_stage, "must be 0, 1, 2 or 3")
        _check(0 < self.timeout_s <= 365 * 86400, "engine.timeout_s", self.timeout_s, "must be > 0 and at most a year")


@dataclass
class OutputConfig:
    dir: str = "runs"
    name: str | None = None  # None: <model>-<method>-<timestamp>
    log_every: int = 10  # optimizer steps between TensorBoard/progress updates
    eval_every: int = 1  # epochs between evaluations (and always after the last)
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0: only at the end (and on preemption)
    checkpoint_every_min: float = 0.0  # also every so many minutes; 0: off
    keep_last: int = 3  # complete checkpoints kept (older ones removed after a newer is complete); 0: all
    # sharded: each rank saves its own shard of the trainable weights and AdamW state (nothing gathered);
    # consolidated: full tensors in one file (rank 0); auto: sharded when that state passes 1 GiB on 2+ ranks.
    checkpoint_format: Literal["auto", "consolidated", "sharded"] = "auto"
    # A training run started without --resume where one has trained before (checkpoints, logs, metrics, weights):
    # false refuses it (one line); true removes those outputs first. The selection (scores, allocation) is kept.
    overwrite: bool = False
    log_samples: bool = False  # write each step's sample keys per rank to samples/rank_RRRRR.txt (data audits)
    progress: bool = True
    peak_tflops: float | None = None  # a device's peak TFLOP/s for MFU; None: known GPUs by name (none on CPU)

    def validate(self) -> None:
        _check(self.name is None or _inside(self.name), "output.name", self.name,
               "must be a relative path that stays inside output.dir (no '..' out of it, not absolute, not empty)")
        _check(self.peak_tflops is None or self.peak_tflops > 0, "output.peak_tflops", self.peak_tflops, "must be > 0")
        _check(self.log_every > 0, "output.log_every", self.log_every, "must be > 0")
        _check(self.eval_every > 0, "output.eval_every", self.eval_every, "must be > 0")
        _check(self.checkpoint_every >= 0, "output.checkpoint_every", self.checkpoint_every, "must be >= 0")
        _check(self.checkpoint_every_min >= 0, "output.checkpoint_every_min", self.checkpoint_every_min,
               "must be >= 0")
        _check(self.keep_last >= 0, "output.keep_last", self.keep_last, "must be >= 0")


@dataclass
class Config:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                section.validate()
        self.data.resolve()
        self._resolve_selection()

    def _resolve_selection(self) -> None:
        """The selection a PEFT method implies: spt_lora -> SPT with LoRA, spt_adapter -> SPT with Adapters,
        gps -> GPS. Unset keys take it; set keys must agree."""
        sel, name = self.selection, self.method.name
        implied = dataclasses.replace(sel, method=None, structured=None).resolved(name)
        if get_method(name).selects:
            _check(sel.method in (None, implied.method), "selection.method", sel.method,
                   f"method.name {name} needs {implied.method}")
            _check(sel.structured in (None, implied.structured) or implied.method == "gps", "selection.structured",
                   sel.structured, f"method.name {name} needs {implied.structured}")
        self.selection = sel.resolved(name)
        if self.selection.k is None:
            found = find_task(self.data.task) if self.data.task else None
            self.selection.k = found[1].gps_k if found else 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def per_rank_batch_size(cfg: Config, world_size: int) -> int:
    """data.batch_size on `world_size` ranks: data.global_batch_size / (ranks x optim.grad_accum) when the
    global batch is set (the recipes' way), else data.batch_size as given."""
    total = cfg.data.global_batch_size
    if total is None:
        return cfg.data.batch_size
    shares = world_size * cfg.optim.grad_accum
    if total % shares:
        raise UserError(f"data.global_batch_size: {total} does not split evenly over {world_size} ranks x "
                        f"optim.grad_accum {cfg.optim.grad_accum}")
    return total // shares


def _inside(name: str) -> bool:
    """A run name that is a directory strictly below output.dir: relative, no NUL, not '.' or '..'-escaping."""
    normal = os.path.normpath(name) if name and "\0" not in name else ""
    return bool(normal) and not os.path.isabs(name) and normal != "." and normal != ".." \
        and not normal.startswith(".." + os.sep)


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise UserError(f"{key}: {why} (got {short_repr(value)})")


def short_repr(value: Any) -> str:
    """repr() cut to a line's worth: a message names a value, it does not print a crafted one whole."""
    text = _REPR.repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 3, 6, 6, 60, 60


class NoAliasLoader(yaml.SafeLoader):
    """YAML's safe loader without anchors and aliases (&a / *a): a config never needs them, and a few nested
    aliases (a "billion laughs" file) expand to more values than any machine holds."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"alias *{event.anchor}: aliases are not allowed here",
                                              event.start_mark)
        return super().compose_node(parent, index)


def safe_yaml(stream) -> Any:
    """yaml.safe_load without aliases (NoAliasLoader)."""
    return yaml.load(stream, Loader=NoAliasLoader)  # noqa: S506 - a SafeLoader subclass


def load_config(paths: str | list[str] | tuple[str, ...] | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Reads YAML files (none, one or several: merged in order, later keys win, sections merged key by key),
    applies `a.b=value` overrides, builds and validates a Config. Several files compose a run from parts,
    e.g. configs/recipes/vtab.yaml + configs/backbones/vit_h14.yaml + configs/methods/spt_lora.yaml."""
    raw: dict[str, Any] = {}
    for path in [paths] if isinstance(paths, str) else paths or ():
        _merge(raw, _read_yaml(path))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"override '{item}': expected key=value, e.g. optim.lr=3e-4")
        _set_dotted(raw, key.strip(), _parse_value(key.strip(), text) if text.strip() else None)
    cfg = _build(Config, raw, prefix="")
    cfg.validate()
    return cfg


def _parse_value(key: str, text: str) -> Any:
    """An override's value as YAML (safe: plain values, lists, mappings; no tags that build objects)."""
    try:
        return safe_yaml(text)
    except yaml.YAMLError as e:
        why = " ".join(str(getattr(e, "problem", None) or "not valid YAML").split())
        raise UserError(f"{key}: cannot read the value {short_repr(text)} ({why})") from None
    except RecursionError:
        raise UserError(f"{key}: cannot read the value: nested too deeply") from None


def _read_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            raw = safe_yaml(f) or {}
    except (FileNotFoundError, IsADirectoryError):
        raise UserError(f"--config: no such file '{path}'") from None
    except UnicodeDecodeError:
        raise UserError(f"--config: '{path}' is not a text file (YAML in UTF-8)") from None
    except OSError as e:
        raise UserError(f"--config: cannot read '{path}' ({e.strerror})") from None
    except RecursionError:
        raise UserError(f"--config: '{path}' is nested too deeply") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        why = getattr(e, "problem", None) or ""
        raise UserError(f"--config: '{path}'{where} is not valid YAML{f' ({why})' if why else ''}") from None
    if not isinstance(raw, dict):
        raise UserError(f"--config: '{path}' must hold a mapping of sections, not {type(raw).__name__}")
    return raw


def _merge(into: dict[str, Any], update: dict[str, Any]) -> None:
    """Deep merge: sections (mappings) key by key, anything else replaced."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def save_config(cfg: Config, path: str) -> None:
    """Writes the resolved config atomically, loadable again with `load_config`."""
    write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def get_dotted(tree: dict[str, Any], dotted: str) -> Any:
    """The value at a dotted key of a `Config.to_dict()` tree, e.g. 'selection.budget'."""
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"{'.'.join(parents[: i + 1])}: is a value, not a section (override '{dotted}')")
        node = child
    node[leaf] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a section (mapping), got {type(raw).__name__} {short_repr(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields), key=str)  # a YAML key may be a number or null
    if unknown:
        raise UserError(f"{prefix}{unknown[0]}: unknown key (known in {where}: {', '.join(fields)})")
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            values[name] = _coerce(value, hint, f"{prefix}{name}")
    return cls(**values)


_INT_LIMIT = 2**63  # integers past int64 overflow torch, timedelta and the checkpoint files


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Checks `value` against a type hint; ints are accepted where floats are expected, nothing else is cast."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            raise UserError(f"{key}: must be one of {', '.join(map(str, args))} (got {short_repr(value)})")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{key}: expected a list, got {type(value).__name__} {short_repr(value)}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if hint in (int, float) and isinstance(value, int) and not isinstance(value, bool) and \
            not -_INT_LIMIT <= value < _INT_LIMIT:
        raise UserError(f"{key}: {value} is too large (the limit is {_INT_LIMIT - 1}, a 64-bit integer)")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string, not a float.
        try:
            value = float(value)
        except ValueError:
            raise UserError(f"{key}: expected a number, got {short_repr(value)}") from None
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{key}: expected a finite number, got {short_repr(value)}")
    if hint is bool and not isinstance(value, bool):
        raise UserError(f"{key}: expected true or false, got {short_repr(value)}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise UserError(f"{key}: expected an integer, got {type(value).__name__} {short_repr(value)}")
    if not isinstance(value, hint):
        raise UserError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {short_repr(value)}")
    return value
