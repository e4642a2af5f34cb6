"""The PEFT model of an allocation (SPT or GPS): the backbone frozen, and trainable only what the allocation
chose: sparse deltas, LoRA or Adapter modules on matrices (q, k, v blocks of the fused qkv separately), fully
tuned vectors (a row block of the fused qkv bias alone: a delta on its rows); plus the head, and for SPT the
cls_token (SPEC 2-3; GPS's biases are the allocation's fully tuned vectors).

`describe(model)` and `apply_description(model, description)` are the structure as plain JSON: the artifact
stores it, so a fresh timm model can be given the same trainable structure again.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import torch
from timm.layers import LayerScale
from torch import nn

from spt_dist.backbones import spec_for
from spt_dist.errors import UserError
from spt_dist.peft import fingerprint
from spt_dist.peft.tuned import SPARSE_MODES, Tuned, tune
from spt_dist.selection.allocation import Allocation, gps_record, spt_record
from spt_dist.selection.gps_allocation import check_k
from spt_dist.selection.layout import Layout, build_layout


def read_allocation(directory: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """allocation.json and allocation.safetensors of a run directory (`method.allocation`)."""
    try:
        allocation = Allocation.load(directory)
    except UserError as e:  # "allocation: ..." names the setting that pointed there
        raise UserError(f"method.{e}; run `--stage select` first") from None
    return allocation.record, allocation.indices


def _tune(model: nn.Module, tensor: str) -> tuple[Tuned, str]:
    path, _, name = tensor.rpartition(".")
    try:
        return tune(model, path), name
    except TypeError as e:
        raise UserError(f"allocation: '{tensor}': {e}") from None
    except AttributeError:
        raise UserError(f"allocation: this model has no parameter '{tensor}': was the allocation made for "
                        "another model?") from None


_DECISIONS = ("frozen", "sparse", "full", "lora", "adapter")


def _rows(unit: dict, param: torch.Tensor) -> tuple[int, int]:
    """The unit's output rows [r0, r1) (the whole tensor when it names none), checked against the parameter."""
    rows = unit.get("rows", [0, param.shape[0]])
    if not (isinstance(rows, list) and len(rows) == 2 and all(type(r) is int for r in rows)
            and 0 <= rows[0] < rows[1] <= param.shape[0]):
        raise UserError(f"allocation: unit '{unit['name']}': rows {rows!r} do not fit '{unit['tensor']}' "
                        f"(shape {list(param.shape)}): was the allocation made for another model?")
    return rows[0], rows[1]


def check_allocation(record, indices: dict, model: nn.Module) -> None:
    """An allocation that fits this model, or one line saying what does not (a hand-edited, corrupt or another
    model's allocation must not train something else silently): every loader's check (get_peft_model, the
    trainer, apply_allocation). The units against the parameters, the indices against their tensors, then the
    whole record against the one its picks, settings and this model's layout give, and the picks against the
    indices (_check_record). Nothing is changed before it passes."""
    if not isinstance(record, dict) or record.get("method") not in ("spt", "gps") or \
            not isinstance(record.get("units"), list) or not isinstance(record.get("totals"), dict):
        raise UserError("allocation: allocation.json is not an allocation (method spt|gps, units, totals)")
    if record["method"] == "gps" and "full_vectors" not in record["totals"]:
        raise UserError("allocation: a GPS allocation of an older spt_dist (it trained the norms' biases too); "
                        "make it again with `--stage allocate`")
    layout = build_layout(model, record["method"])
    for key, here in (("scored_params", layout.scored_params), ("backbone_params", layout.backbone_params)):
        if record.get(key) != here:
            raise UserError(f"allocation: made for a model with {record.get(key)!r} {key.replace('_', ' ')}, this "
                            f"one has {here:,}: was the allocation made for another model?")
    params = dict(model.named_parameters())
    tunable = {f"{path}.{name}" if path else name for path, m in model.named_modules()
               if isinstance(m, (nn.Linear, nn.LayerNorm, nn.Conv2d, LayerScale, Tuned))
               for name, _ in m.named_parameters(recurse=False)}
    modules = set()
    for unit in record["units"]:
        if not isinstance(unit, dict) or not isinstance(unit.get("name"), str) or unit.get("tensor") not in params:
            name = unit.get("tensor") if isinstance(unit, dict) else unit
            raise UserError(f"allocation: this model has no parameter {name!r}: was the allocation made for "
                            "another model?")
        param, decision = params[unit["tensor"]], unit.get("decision")
        if decision not in _DECISIONS:
            raise UserError(f"allocation: unit '{unit['name']}': unknown decision {decision!r} "
                            f"(known: {', '.join(_DECISIONS)})")
        r0, r1 = _rows(unit, param)
        size = (r1 - r0) * (param.numel() // param.shape[0])
        if unit.get("size") != size:
            raise UserError(f"allocation: unit '{unit['name']}' has {unit.get('size')!r} entries, rows {r0}:{r1} "
                            f"of this model's '{unit['tensor']}' {size}: was the allocation made for another model?")
        if decision in ("lora", "adapter"):
            block = (unit["tensor"], unit["name"].rsplit(".", 1)[-1])
            if param.ndim != 2 or unit["tensor"] not in tunable or type(unit.get("rank")) is not int or \
                    not 0 < unit["rank"] <= min(r1 - r0, param.shape[1]) or block in modules:
                raise UserError(f"allocation: unit '{unit['name']}': {decision} needs a Linear's weight, a whole rank "
                                f"in [1, {min(r1 - r0, param.shape[-1])}] and one module per block (shape "
                                f"{list(param.shape)}, rank {unit.get('rank')!r})")
            modules.add(block)
        if decision in ("sparse", "full") and (r0, r1) != (0, param.shape[0]) and unit["tensor"] not in tunable:
            raise UserError(f"allocation: unit '{unit['name']}': '{unit['tensor']}' is not a Linear, LayerNorm, "
                            "conv or layer-scale parameter: its entries cannot be tuned apart")
    for name, index in indices.items():
        if name not in params:
            raise UserError(f"allocation: this model has no parameter '{name}': was the allocation made for "
                            "another model?")
        if name not in tunable:
            raise UserError(f"allocation: '{name}' is not a Linear, LayerNorm, conv or layer-scale parameter: its "
                            "entries cannot be tuned apart")
        numel = params[name].numel()
        if not valid_index(index, numel, (torch.int32, torch.int64)):
            raise UserError(f"allocation: the indices of '{name}' must be increasing whole numbers in "
                            f"[0, {numel}) (allocation.safetensors: {index.dtype}, {index.numel()} entries)")
    _check_record(record, indices, layout)


def valid_index(index: torch.Tensor, numel: int, dtypes: tuple[torch.dtype, ...]) -> bool:
    """Flat offsets into a tensor of `numel` entries: 1-D, of one of `dtypes`, strictly increasing, in range."""
    return index.dtype in dtypes and index.ndim == 1 and not (index.numel() and (
        int(index.min()) < 0 or int(index.max()) >= numel or not bool((index[1:] > index[:-1]).all())))


def _first_difference(got: dict, want: dict) -> tuple[str, str, str] | None:
    """(key, got, wanted) where `got` first differs from `want` as JSON (1 is not 1.0 or true); in a nested
    object the key is 'key.sub'; a value that is not there shows as 'missing'."""
    for key in [*want, *(k for k in got if k not in want)]:
        a, b = got.get(key), want.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _first_difference(a, b)
            if inner:
                return (f"{key}.{inner[0]}", *inner[1:])
        elif (key in got) != (key in want) or json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            return key, repr(a) if key in got else "missing", repr(b) if key in want else "missing"
    return None


def _check_record(record: dict, indices: dict[str, torch.Tensor], layout: Layout) -> None:
    """The record is the one its picks, its settings and this model's layout give (spt_record / gps_record: every
    unit present in layout order, each decision and cost, the totals, the cost), and each sparse unit's picks
    are the indices allocation.safetensors holds in its entries, none elsewhere: an edited or mismatched pair
    would train something else than it records."""
    method, units = record["method"], record["units"]
    expected = [u.name for u in layout.units] + (list(layout.fixed_full) if method == "gps" else [])
    listed = [u["name"] for u in units]
    present = set(listed)
    missing = next((name for name in expected if name not in present), None)
    if missing is not None:
        raise UserError(f"allocation: unit '{missing}' of this model is missing from allocation.json "
                        f"({len(listed)} units listed, the model has {len(expected)})")
    if listed != expected:
        odd = next(n for n, e in zip(listed + [None], expected + [None]) if n != e)
        raise UserError(f"allocation: unit '{odd}' is not where this model's layout has it (allocation.json lists "
                        f"the model's {len(expected)} units once each, in layout order)")
    settings = record.get("settings")
    try:
        if method == "spt":
            picks = [u.get("picks") for u in units]
            for unit, count in zip(layout.units, picks):
                if type(count) is not int or not 0 <= count <= unit.size:
                    raise UserError(f"allocation: unit '{unit.name}': picks must be a whole number in [0, "
                                    f"{unit.size}] (got {count!r})")
            want = spt_record(layout, _spt_settings(settings), picks, record.get("threshold"))
        else:
            if not isinstance(settings, dict) or type(settings.get("k")) is not int or settings["k"] < 1:
                raise UserError(f"allocation: settings.k must be a whole number >= 1 (got {settings!r})")
            check_k(layout, settings["k"])
            want = gps_record(layout, settings["k"])
    except UserError as e:
        raise UserError(str(e) if str(e).startswith("allocation: ") else f"allocation: settings: {e}") from None
    for got, wanted in zip(units, want["units"]):
        differs = _first_difference(got, wanted)
        if differs:
            raise UserError(f"allocation: unit '{wanted['name']}': {differs[0]} is {differs[1]}, recomputed: "
                            f"{differs[2]} (from its picks, the settings and this model's layout)")
    differs = _first_difference({k: v for k, v in record.items() if k != "units"},
                                {k: v for k, v in want.items() if k != "units"})
    if differs:
        raise UserError(f"allocation: {differs[0]} is {differs[1]}, recomputed: {differs[2]} (from the units, the "
                        "settings and this model's layout)")
    _check_picks(units, indices, layout)


def _spt_settings(settings) -> dict:
    """An SPT record's settings, checked to be what spt_record can compute with."""
    if not isinstance(settings, dict):
        raise UserError(f"allocation: settings must be a JSON object (got {settings!r})")
    number = lambda x: type(x) in (int, float) and math.isfinite(x) and x > 0  # noqa: E731
    checks = {"budget": (number, "a number > 0"), "alpha": (number, "a number > 0"), "beta": (number, "a number > 0"),
              "module_rank": (lambda x: type(x) is int and x >= 1, "a whole number >= 1"),
              "structured": (lambda x: x in ("lora", "adapter", "none"), "lora, adapter or none")}
    for key, (ok, what) in checks.items():
        if not ok(settings.get(key)):
            raise UserError(f"allocation: settings.{key} must be {what} (got {settings.get(key)!r})")
    return settings


def _check_picks(units: list[dict], indices: dict[str, torch.Tensor], layout: Layout) -> None:
    """Each sparse unit's picks = the indices in its entries; no index outside the sparse units."""
    counted: dict[str, int] = {}
    for unit, entry in zip(layout.units, units):
        if entry["decision"] != "sparse":
            continue
        index = indices.get(unit.tensor)
        if index is None:
            found = 0
        else:
            bounds = torch.searchsorted(index, torch.tensor([unit.start, unit.stop], dtype=index.dtype))
            found = int(bounds[1] - bounds[0])
        if found != entry["picks"]:
            raise UserError(f"allocation: unit '{unit.name}' records {entry['picks']} picks, allocation.safetensors "
                            f"holds {found} of its indices" + (f" (it has none of '{unit.tensor}')" if index is None
                                                               else "") + ": the pair does not belong together")
        counted[unit.tensor] = counted.get(unit.tensor, 0) + found
    for name, index in indices.items():
        stray = index.numel() - counted.get(name, 0)
        if stray:
            raise UserError(f"allocation: allocation.safetensors holds {stray} {'index' if stray == 1 else 'indices'} "
                            f"of '{name}' outside the allocation's sparse units")


def apply_allocation(model: nn.Module, record: dict, indices: dict[str, torch.Tensor], *,
                     sparse_update: str = "delta", dropout: float = 0.0, drop_path: float = 0.0) -> nn.Module:
    check_allocation(record, indices, model)
    spec_for(model).prepare_model(model)
    params = dict(model.named_parameters())
    model.requires_grad_(False)
    sparse = {name: index.to(torch.int64) for name, index in indices.items()}
    for unit in record["units"]:
        decision, tensor = unit["decision"], unit["tensor"]
        if decision in ("lora", "adapter"):
            tuned, _ = _tune(model, tensor)
            block = unit["name"].rsplit(".", 1)[-1]
            r0, r1 = _rows(unit, params[tensor])
            if decision == "lora":
                tuned.add_lora(block, (r0, r1), unit["rank"], scale=1.0)  # SPEC 2: no alpha/r scaling
            else:
                tuned.add_adapter(block, (r0, r1), unit["rank"])
            tuned.set_dropout(dropout, drop_path)
        elif decision == "full":
            r0, r1 = _rows(unit, params[tensor])
            if (r0, r1) == (0, params[tensor].shape[0]):
                params[tensor].requires_grad_(True)
            else:  # a fused bias's q, k or v rows: trained as sparse entries are; joins the tensor's sparse picks
                cols = params[tensor].numel() // params[tensor].shape[0]
                picked = sparse.get(tensor, torch.zeros(0, dtype=torch.int64))
                sparse[tensor] = torch.unique(torch.cat([picked, torch.arange(r0 * cols, r1 * cols)]))
    for tensor, index in sparse.items():
        tuned, name = _tune(model, tensor)
        tuned.add_sparse(name, index, sparse_update)
    if record["method"] == "spt" and spec_for(model).class_token_numel(model):  # none in Swin
        model.cls_token.requires_grad_(True)
    model.get_classifier().requires_grad_(True)
    record_base_fingerprint(model)
    return model


def record_base_fingerprint(model: nn.Module) -> None:
    """Keeps with the model the fingerprint of the frozen base its artifact will be merged onto, computed now,
    while the model is still whole (an engine shards it later; `save_pretrained` writes it)."""
    state = model.state_dict()
    fingerprint.record(model, fingerprint.base_fingerprint(state, trainable_state(state, model)))


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


_ADDED = {"lora": ("lora_A_", "lora_B_"),
          "adapters": ("adapter_down_", "adapter_down_bias_", "adapter_up_", "adapter_up_bias_")}


def check_description(description) -> str | None:
    """What is wrong with the types of a structure as `describe` writes it (an artifact's peft_config.json), or
    None: the key (under 'structure') and what it must be."""
    if not isinstance(description, dict):
        return f"'structure' must be a JSON object with layers and full (got {type(description).__name__})"
    layers, full = description.get("layers"), description.get("full")
    if not isinstance(layers, dict):
        return f"'structure.layers' must be a JSON object of tuned layers (got {type(layers).__name__})"
    if not isinstance(full, list) or not all(isinstance(name, str) for name in full):
        odd = next((n for n in full if not isinstance(n, str)), None) if isinstance(full, list) else full
        return f"'structure.full' must be a list of parameter names (got {odd!r})"
    for path, spec in layers.items():
        where = f"structure.layers.{path}"
        if not isinstance(spec, dict):
            return f"'{where}' must be a JSON object (sparse, lora, lora_scale, adapters)"
        sparse = spec.get("sparse")
        if not isinstance(sparse, dict) or not all(mode in SPARSE_MODES for mode in sparse.values()):
            return f"'{where}.sparse' must map parameter names to {' or '.join(SPARSE_MODES)} (got {sparse!r})"
        for key in _ADDED:
            blocks = spec.get(key)
            if not isinstance(blocks, dict) or not all(
                    isinstance(r, list) and len(r) == 2 and all(type(x) is int for x in r) and 0 <= r[0] < r[1]
                    for r in blocks.values()):
                return f"'{where}.{key}' must map block names to output rows [first, end) (got {blocks!r})"
        scale = spec.get("lora_scale")
        if type(scale) not in (int, float) or not math.isfinite(scale):
            return f"'{where}.lora_scale' must be a finite number (got {scale!r})"
    return None


def described_tensors(description: dict, own: Mapping[str, torch.Tensor]) -> dict[str, torch.dtype]:
    """Every tensor an artifact of this structure stores (what `trainable_state` takes once `apply_description`
    has given the model the structure), with the dtype the model gives it; `own`: the model's state dict before
    that. A name the model lacks raises KeyError(name), LoRA or Adapter rows beyond the weight ValueError."""
    out = {}
    for path, spec in description["layers"].items():
        for name, mode in spec["sparse"].items():
            param = own[f"{path}.{name}"]
            if mode == "delta":
                out[f"{path}.{name}_delta_index"], out[f"{path}.{name}_delta"] = torch.int64, param.dtype
            else:
                out[f"{path}.{name}_mask"], out[f"{path}.{name}"] = torch.bool, param.dtype
        for key, prefixes in _ADDED.items():
            for block, (_, end) in spec[key].items():
                weight = own[f"{path}.weight"]
                if weight.ndim != 2 or end > weight.shape[0]:
                    raise ValueError(f"'{path}' {key} '{block}': rows up to {end} do not fit its weight "
                                     f"{list(weight.shape)}")
                out.update({f"{path}.{prefix}{block}": weight.dtype for prefix in prefixes})
    for name in description["full"]:
        out[name] = own[name].dtype
    return out


def _is_added(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf.endswith("_delta") or leaf.startswith(("lora_", "adapter_"))


def _is_masked(model: nn.Module, name: str) -> bool:
    path, _, leaf = name.rpartition(".")
    module = model.get_submodule(path) if path else model
    return isinstance(module, Tuned) and module.sparse.get(leaf) == "dense_masked"


def apply_description(model: nn.Module, description: dict, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Gives a fresh model the structure of `describe` (index buffers and module shapes from `tensors`)."""
    spec_for(model).prepare_model(model)  # e.g. EVA-02's fused qkv: a user's fresh timm model is not prepared yet
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
    names |= {f"{path}.{n}" if path else n for path, module in model.named_modules() if isinstance(module, Tuned)
              for n, _ in module.named_buffers(recurse=False) if n.endswith(("_delta_index", "_mask"))}
    return {k: v for k, v in model_state.items() if k in names}
