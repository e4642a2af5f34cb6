"""The PEFT model of an allocation (SPT or GPS): the backbone frozen, and trainable only what the allocation
chose: sparse deltas, LoRA or Adapter modules on matrices (q, k, v blocks of the fused qkv separately), fully
tuned vectors (a row block of the fused qkv bias alone: a delta on its rows); plus the head, and for SPT the
cls_token (SPEC 2-3; GPS's biases are the allocation's fully tuned vectors).

`describe(model)` and `apply_description(model, description)` are the structure as plain JSON: the artifact
stores it, so a fresh timm model can be given the same trainable structure again.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file
from torch import nn

from spt_dist.data.shards import read_json
from spt_dist.errors import UserError
from spt_dist.peft.tuned import Tuned, tune
from spt_dist.selection.report import ALLOCATION_JSON, ALLOCATION_INDICES


def read_allocation(directory: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """allocation.json and allocation.safetensors of a run directory."""
    record_path = os.path.join(directory, ALLOCATION_JSON)
    indices_path = os.path.join(directory, ALLOCATION_INDICES)
    for path in (record_path, indices_path):
        if not os.path.isfile(path):
            raise UserError(f"method.allocation: '{path}' does not exist; run `--stage select` first")
    return read_json(record_path), load_file(indices_path)


def _tune(model: nn.Module, tensor: str) -> tuple[Tuned, str]:
    path, _, name = tensor.rpartition(".")
    try:
        return tune(model, path), name
    except TypeError as e:
        raise UserError(f"allocation: '{tensor}': {e}") from None
    except AttributeError:
        raise UserError(f"allocation: this model has no parameter '{tensor}': was the allocation made for "
                        "another model?") from None


def _full_rows(unit: dict, param: torch.Tensor) -> torch.Tensor | None:
    """The flat indices of a fully tuned vector that is a row block of its tensor (a fused bias's q, k or v);
    None when the unit is the whole tensor."""
    rows = unit.get("rows")
    if rows is None or list(rows) == [0, param.numel()]:
        return None
    if param.ndim != 1 or not (isinstance(rows, list) and len(rows) == 2 and all(type(r) is int for r in rows)
                               and 0 <= rows[0] < rows[1] <= param.numel()):
        raise UserError(f"allocation: unit '{unit['name']}': rows {rows} do not fit '{unit['tensor']}' "
                        f"(shape {list(param.shape)})")
    return torch.arange(rows[0], rows[1])


def apply_allocation(model: nn.Module, record: dict, indices: dict[str, torch.Tensor], *,
                     sparse_update: str = "delta", dropout: float = 0.0, drop_path: float = 0.0) -> nn.Module:
    if record["method"] == "gps" and "full_vectors" not in record["totals"]:
        raise UserError("allocation: a GPS allocation of an older spt_dist (it trained the norms' biases too); "
                        "make it again with `--stage allocate`")
    model.requires_grad_(False)
    params = dict(model.named_parameters())
    sparse = {name: index.to(torch.int64) for name, index in indices.items()}
    for unit in record["units"]:
        decision, tensor = unit["decision"], unit["tensor"]
        if tensor not in params:
            raise UserError(f"allocation: this model has no parameter '{tensor}': was the allocation made for "
                            "another model?")
        if decision in ("lora", "adapter"):
            tuned, _ = _tune(model, tensor)
            block = unit["name"].rsplit(".", 1)[-1]
            r0, r1 = unit["rows"]
            if decision == "lora":
                tuned.add_lora(block, (r0, r1), unit["rank"], scale=1.0)  # SPEC 2: no alpha/r scaling
            else:
                tuned.add_adapter(block, (r0, r1), unit["rank"])
            tuned.set_dropout(dropout, drop_path)
        elif decision == "full":
            rows = _full_rows(unit, params[tensor])
            if rows is None:
                params[tensor].requires_grad_(True)
            else:  # trains those entries only, as sparse entries do; joins the tensor's sparse picks, if any
                picked = sparse.get(tensor, torch.zeros(0, dtype=torch.int64))
                sparse[tensor] = torch.unique(torch.cat([picked, rows]))
    for tensor, index in sparse.items():
        tuned, name = _tune(model, tensor)
        tuned.add_sparse(name, index, sparse_update)
    if record["method"] == "spt" and getattr(model, "cls_token", None) is not None:
        model.cls_token.requires_grad_(True)
    model.get_classifier().requires_grad_(True)
    return model


def describe(model: nn.Module) -> dict:
    """The trainable structure: per tuned layer its sparse parameters, LoRA and Adapter blocks; and the names of
    the parameters trained in full."""
    layers = {}
    for path, module in model.named_modules():
        if isinstance(module, Tuned):
            layers[path] = {"sparse": dict(module.sparse),
                            "lora": {b: list(rows) for b, rows in module.lora.items()}, "lora_scale": module.lora_scale,
                            "adapters": {b: list(rows) for b, rows in module.adapters.items()}}
    full = [name for name, p in model.named_parameters()
            if p.requires_grad and not _is_added(name) and not _is_masked(model, name)]
    return {"layers": layers, "full": full}


def _is_added(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf.endswith("_delta") or leaf.startswith(("lora_", "adapter_"))


def _is_masked(model: nn.Module, name: str) -> bool:
    path, _, leaf = name.rpartition(".")
    module = model.get_submodule(path) if path else model
    return isinstance(module, Tuned) and module.sparse.get(leaf) == "dense_masked"


def apply_description(model: nn.Module, description: dict, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Gives a fresh model the structure of `describe` (index buffers and module shapes from `tensors`)."""
    model.requires_grad_(False)
    for path, spec in description["layers"].items():
        tuned = tune(model, path)
        for name, mode in spec["sparse"].items():
            index = tensors[f"{path}.{name}_delta_index"] if mode == "delta" else \
                torch.nonzero(tensors[f"{path}.{name}_mask"].reshape(-1)).view(-1)
            tuned.add_sparse(name, index, mode)
        for block, rows in spec["lora"].items():
            tuned.add_lora(block, tuple(rows), tensors[f"{path}.lora_A_{block}"].shape[0], spec["lora_scale"])
        for block, rows in spec["adapters"].items():
            tuned.add_adapter(block, tuple(rows), tensors[f"{path}.adapter_down_{block}"].shape[0])
    params = dict(model.named_parameters())
    for name in description["full"]:
        params[name].requires_grad_(True)
    return model


def trainable_state(model_state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The artifact's tensors out of a (consolidated) state dict: everything trainable and the index buffers."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    names |= {n for n, _ in model.named_buffers() if n.endswith(("_delta_index", "_mask"))}
    return {k: v for k, v in model_state.items() if k in names}


def no_decay_parameters(model: nn.Module) -> set[int]:
    """ids of parameters that carry sparse entries in dense_masked mode: no weight decay on sparse entries."""
    out = set()
    for module in model.modules():
        if isinstance(module, Tuned):
            out |= {id(getattr(module, n)) for n, mode in module.sparse.items() if mode == "dense_masked"}
    return out
