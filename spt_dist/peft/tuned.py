"""`Tuned`: a Linear, LayerNorm, Conv2d or layer scale whose frozen parameters carry what an allocation trains.

The module takes over the parameters of the layer it replaces under the same names (`weight`, `bias`; a layer
scale's `gamma`: timm's LayerScale in DINOv2 / DeiT-III / CLIP ViTs), so
state-dict keys stay timm's, and adds, all as its own direct parameters (ZeRO-3 gathers a module's direct
parameters before its forward; FSDP2 shards per block):
- sparse entries: `<param>_delta`, a zero-initialised delta on the entries listed in the int64 buffer
  `<param>_delta_index` (flat offsets); the effective parameter is `param + scatter(delta)`. For a Linear's
  weight the backward computes each delta's gradient directly (nnz × tokens work, no dense weight gradient,
  see _LinearWithDelta); vectors and the patch-embedding conv take the dense gradient gathered at the indices;
  or, in `dense_masked` mode (the GPS reference's way, for comparison), the whole parameter trains and a
  bool mask zeroes the gradient of every other entry;
- LoRA on row blocks of a Linear (parallel: y[rows] += drop_path(scale · B A dropout(x)); A kaiming-uniform,
  B zero);
- Adapters on row blocks of a Linear (sequential: y[rows] += drop_path(up(GELU(down(dropout(y[rows]))))), up
  zero). Dropout and drop-path (per sample) are the SPT reference's, 0.1 each in its recipe (SPEC 2).
A block is a row range: timm's fused qkv carries separate q, k and v modules.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale
from torch import nn

SPARSE_MODES = ("delta", "dense_masked")


class _MaskGradient(torch.autograd.Function):
    """Identity forward; the backward zeroes the gradient wherever the mask is False."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(mask)
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        mask, = ctx.saved_tensors
        return grad * mask, None


class _LinearWithDelta(torch.autograd.Function):
    """y = x (W + D)ᵀ + b, D zero but for the deltas δ at (rows, cols), W frozen.

    Autograd through `W.index_add(δ)` would form the dense weight gradient gᵀx (a full-size matmul per layer:
    full fine-tuning's backward) only to gather nnz entries from it. Here the backward returns the input's
    gradient and each delta's own, g_δ[k] = Σ_t grad_y[t, rows_k] · x[t, cols_k] (nnz × tokens work), and the
    forward keeps only the input columns some delta reads (unless that is most of them)."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta, flat_index, rows, col_slot, used_cols):
        effective = weight.reshape(-1).index_add(0, flat_index, delta).view_as(weight)
        y = F.linear(x, effective, bias)
        x2 = x.reshape(-1, x.shape[-1])
        picked = x2.t() if used_cols is None else x2.index_select(1, used_cols).t()
        ctx.save_for_backward(picked.contiguous(), weight, delta, flat_index, rows, col_slot)
        ctx.x_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, grad_y):
        picked_t, weight, delta, flat_index, rows, col_slot = ctx.saved_tensors
        g2 = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            effective = weight.reshape(-1).index_add(0, flat_index, delta).view_as(weight)
            grad_x = (g2 @ effective).view(ctx.x_shape)
        if ctx.needs_input_grad[2]:
            grad_bias = g2.sum(0)
        grad_t = g2.t().contiguous()  # [out, tokens]: each delta reads one contiguous row of it and of picked_t
        grad_delta = torch.empty_like(delta)
        for start in range(0, delta.numel(), _DELTA_CHUNK):
            stop = min(start + _DELTA_CHUNK, delta.numel())
            grad_delta[start:stop] = (grad_t[rows[start:stop]] * picked_t[col_slot[start:stop]]).sum(1)
        return grad_x, None, grad_bias, grad_delta, None, None, None, None


_DELTA_CHUNK = 4096  # deltas per step of the backward: bounds its temporaries to 2 x 4096 x tokens


class Tuned(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        if isinstance(layer, nn.Linear):
            self.kind = "linear"
        elif isinstance(layer, nn.LayerNorm):
            self.kind, self.normalized_shape, self.eps = "layer_norm", layer.normalized_shape, layer.eps
        elif isinstance(layer, nn.Conv2d) and layer.padding_mode == "zeros":
            self.kind = "conv2d"
            self.conv = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
        elif isinstance(layer, LayerScale):
            self.kind = "layer_scale"
        else:
            raise TypeError(f"cannot tune a {type(layer).__name__}")
        self.param_names = ("gamma",) if self.kind == "layer_scale" else ("weight", "bias")
        for name in self.param_names:
            setattr(self, name, getattr(layer, name))
        self.sparse: dict[str, str] = {}  # parameter name -> mode
        self.lora: dict[str, tuple[int, int]] = {}
        self.adapters: dict[str, tuple[int, int]] = {}
        self.lora_scale = 1.0
        self.dropout = nn.Identity()
        self.drop_path = nn.Identity()

    # ------------------------------------------------------------------------------------------ building

    def add_sparse(self, name: str, indices: torch.Tensor, mode: str = "delta") -> None:
        param = getattr(self, name)
        index = indices.to(device=param.device, dtype=torch.int64)
        if mode == "delta":
            self.register_buffer(f"{name}_delta_index", index)
            self.register_parameter(f"{name}_delta", nn.Parameter(
                torch.zeros(index.numel(), device=param.device, dtype=param.dtype)))
            if self.kind == "linear" and name == "weight":  # for _LinearWithDelta; derived, not saved
                cols = index % param.shape[1]
                used, slot = torch.unique(cols, return_inverse=True)
                few = used.numel() <= param.shape[1] // 2
                self.register_buffer("_delta_rows", index // param.shape[1], persistent=False)
                self.register_buffer("_delta_col_slot", slot if few else cols, persistent=False)
                self.register_buffer("_delta_used_cols", used if few else None, persistent=False)
        elif mode == "dense_masked":
            mask = torch.zeros(param.numel(), dtype=torch.bool, device=param.device)
            mask[index] = True
            self.register_buffer(f"{name}_mask", mask.view_as(param))
            param.requires_grad_(True)
        else:
            raise ValueError(mode)
        self.sparse[name] = mode

    def add_lora(self, block: str, rows: tuple[int, int], rank: int, scale: float = 1.0) -> None:
        assert self.kind == "linear"
        w = self.weight
        a = torch.empty(rank, w.shape[1], device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear and the LoRA reference
        self.register_parameter(f"lora_A_{block}", nn.Parameter(a))
        self.register_parameter(f"lora_B_{block}", nn.Parameter(
            torch.zeros(rows[1] - rows[0], rank, device=w.device, dtype=w.dtype)))
        self.lora[block], self.lora_scale = tuple(rows), scale

    def add_adapter(self, block: str, rows: tuple[int, int], rank: int) -> None:
        assert self.kind == "linear"
        w, width = self.weight, rows[1] - rows[0]
        down = nn.Linear(width, rank, device=w.device, dtype=w.dtype)  # nn.Linear's own init for down
        self.register_parameter(f"adapter_down_{block}", nn.Parameter(down.weight.detach()))
        self.register_parameter(f"adapter_down_bias_{block}", nn.Parameter(down.bias.detach()))
        self.register_parameter(f"adapter_up_{block}", nn.Parameter(torch.zeros(width, rank, device=w.device, dtype=w.dtype)))
        self.register_parameter(f"adapter_up_bias_{block}", nn.Parameter(torch.zeros(width, device=w.device, dtype=w.dtype)))
        self.adapters[block] = tuple(rows)

    def set_dropout(self, p: float, drop_path: float = 0.0) -> None:
        """Dropout on the modules' input, per-sample drop-path on their output (training only)."""
        self.dropout = nn.Dropout(p) if p > 0 else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    # ------------------------------------------------------------------------------------------ forward

    def effective(self, name: str) -> torch.Tensor | None:
        param = getattr(self, name)
        mode = self.sparse.get(name)
        if mode == "delta":
            delta = getattr(self, f"{name}_delta")
            return param.reshape(-1).index_add(0, getattr(self, f"{name}_delta_index"), delta).view_as(param)
        if mode == "dense_masked":
            return _MaskGradient.apply(param, getattr(self, f"{name}_mask"))
        return param

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layer_scale":  # out of place: the input may be needed for the gamma delta's gradient
            return x * self.effective("gamma")
        bias = self.effective("bias") if self.bias is not None else None
        if self.kind == "linear" and self.sparse.get("weight") == "delta":
            y = _LinearWithDelta.apply(x, self.weight, bias, self.weight_delta, self.weight_delta_index,
                                       self._delta_rows, self._delta_col_slot, self._delta_used_cols)
        else:
            weight = self.effective("weight")
            if self.kind == "layer_norm":
                return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)
            if self.kind == "conv2d":
                return F.conv2d(x, weight, bias, **self.conv)
            y = F.linear(x, weight, bias)
        if self.lora:
            h = self.dropout(x)
            width = y.shape[-1]
            for block, (r0, r1) in self.lora.items():
                # Out of place: y may be a view made inside a custom Function (_LinearWithDelta on a 3-D input),
                # which autograd does not let anyone change in place. Zero padding adds exactly nothing elsewhere.
                a, b = getattr(self, f"lora_A_{block}"), getattr(self, f"lora_B_{block}")
                out = self.drop_path(self.lora_scale * F.linear(F.linear(h, a), b))
                y = y + (out if (r0, r1) == (0, width) else F.pad(out, (r0, width - r1)))
        if self.adapters:  # sequential on row blocks: the block's output is the adapter's input, so rebuild y
            pieces, start = [], 0
            for block, (r0, r1) in sorted(self.adapters.items(), key=lambda item: item[1]):
                piece = y[..., r0:r1]
                down = F.linear(self.dropout(piece), getattr(self, f"adapter_down_{block}"),
                                getattr(self, f"adapter_down_bias_{block}"))
                up = F.linear(F.gelu(down), getattr(self, f"adapter_up_{block}"), getattr(self, f"adapter_up_bias_{block}"))
                pieces += [y[..., start:r0], piece + self.drop_path(up)]
                start = r1
            y = torch.cat([*pieces, y[..., start:]], dim=-1)
        return y

    # ------------------------------------------------------------------------------------------ merging

    @torch.no_grad()
    def merged(self) -> dict[str, torch.Tensor]:
        """The plain layer's parameters with the deltas and LoRA products folded in (adapters cannot be)."""
        if self.adapters:
            raise ValueError("adapters are sequential and non-linear: they cannot be merged into the weights")
        out = {}
        for name in self.param_names:
            if getattr(self, name) is not None:
                out[name] = self.effective(name).detach().clone()
        for block, (r0, r1) in self.lora.items():
            out["weight"][r0:r1] += self.lora_scale * (getattr(self, f"lora_B_{block}") @ getattr(self, f"lora_A_{block}"))
        return out


    @torch.no_grad()
    def unwrap(self) -> nn.Module:
        """The plain layer (nn.Linear, nn.LayerNorm, nn.Conv2d or LayerScale) with what was learnt merged in."""
        merged = self.merged()
        weight = merged["gamma" if self.kind == "layer_scale" else "weight"]
        with torch.device("meta"):
            if self.kind == "layer_scale":
                layer = LayerScale(weight.shape[0])
            elif self.kind == "linear":
                layer = nn.Linear(weight.shape[1], weight.shape[0], bias=self.bias is not None)
            elif self.kind == "layer_norm":
                layer = nn.LayerNorm(self.normalized_shape, eps=self.eps, bias=self.bias is not None)
            else:
                out_channels, in_per_group, *kernel = weight.shape
                layer = nn.Conv2d(in_per_group * self.conv["groups"], out_channels, tuple(kernel),
                                  bias=self.bias is not None, **self.conv)
        for name, value in merged.items():  # frozen, as the base the deltas were trained on
            setattr(layer, name, nn.Parameter(value, requires_grad=False))
        return layer


def tune(model: nn.Module, path: str) -> Tuned:
    """The `Tuned` at `path`, replacing the plain layer there on first use."""
    layer = model.get_submodule(path)
    if isinstance(layer, Tuned):
        return layer
    parent_path, _, leaf = path.rpartition(".")
    tuned = Tuned(layer)
    setattr(model.get_submodule(parent_path) if parent_path else model, leaf, tuned)
    return tuned
