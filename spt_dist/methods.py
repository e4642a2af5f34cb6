"""The fine-tuning methods, one registration each: what a method selects (if anything), how its trainable
structure is made, and what the reports call its budget. Config, trainer, planner, reports and sweeps ask
this registry instead of comparing names. Torch-free: the config (and the Slurm launcher) read it.

A new method is one `register_peft_method` call, e.g. SPT with sparse entries only:

    register_peft_method(PeftMethod("spt_sparse", selection="spt", structured="none"))

or a baseline with its own way of choosing what trains (a function (model, MethodConfig) -> model, or its
"module:function" path, resolved when used):

    register_peft_method(PeftMethod("bitfit", apply="my_package.bitfit:apply", budget=None))
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from spt_dist.errors import UserError


@dataclass(frozen=True)
class PeftMethod:
    name: str
    # 'spt' | 'gps': the method trains an allocation of that selection (score pass + allocation); None: a
    # baseline, whose `apply` makes what trains.
    selection: str | None = None
    structured: str | None = None  # SPT: the module structured matrices get ('lora' | 'adapter' | 'none')
    apply: Callable | str | None = None  # baselines: (model, MethodConfig) -> model, or "module:function"
    mergeable: bool = True  # its artifact folds into plain weights (Adapters are sequential: they do not)
    # FLOPs of a training step: every weight trains (full backward) or only the head (no backward through the
    # blocks); otherwise a frozen backbone still back-propagates through every block to its modules.
    backward: str = "frozen_backbone"  # 'full' | 'head_only' | 'frozen_backbone'
    budget: tuple[str, str] | None = None  # (dotted config key, format) of the budget the reports show

    @property
    def selects(self) -> bool:
        return self.selection is not None

    def apply_fn(self) -> Callable:
        if callable(self.apply):
            return self.apply
        module, _, function = str(self.apply).partition(":")
        return getattr(importlib.import_module(module), function)

    def budget_label(self, config: dict) -> str | None:
        """The budget as the reports show it, from a `Config.to_dict()` tree."""
        if self.budget is None:
            return None
        from spt_dist.config import get_dotted  # noqa: PLC0415 - the config imports this registry
        return self.budget[1].format(get_dotted(config, self.budget[0]))


_METHODS: dict[str, PeftMethod] = {}


def register_peft_method(method: PeftMethod) -> PeftMethod:
    if method.selection not in (None, "spt", "gps"):
        raise ValueError(f"{method.name}: selection must be 'spt', 'gps' or None")
    if (method.apply is None) == (method.selection is None):
        raise ValueError(f"{method.name}: a baseline needs `apply`; a selecting method has none")
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> PeftMethod:
    if name not in _METHODS:
        raise UserError(f"method.name: unknown method {name!r} (known: {', '.join(_METHODS)})")
    return _METHODS[name]


def method_names() -> list[str]:
    return list(_METHODS)


for _method in (
    PeftMethod("full", apply="spt_dist.peft.baselines:train_everything", backward="full"),
    PeftMethod("linear", apply="spt_dist.peft.baselines:train_head", backward="head_only"),
    PeftMethod("lora", apply="spt_dist.peft.baselines:add_lora", budget=("method.lora_rank", "r={}")),
    PeftMethod("spt_lora", selection="spt", structured="lora", budget=("selection.budget", "{:g}")),
    PeftMethod("spt_adapter", selection="spt", structured="adapter", mergeable=False,
               budget=("selection.budget", "{:g}")),
    PeftMethod("gps", selection="gps", budget=("selection.k", "k={}")),
):
    register_peft_method(_method)
