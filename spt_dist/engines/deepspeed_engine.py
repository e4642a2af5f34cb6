"""DeepSpeed engine: ZeRO stage 0-3, fp32 or bf16, our AdamW and schedule as client objects."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
from collections.abc import Iterator

from spt_dist.engines.op_cache import use_private_op_cache

use_private_op_cache()  # before DeepSpeed can load (and compile) an op

import deepspeed  # noqa: E402
import torch
import torch.distributed as dist
from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state, safe_get_local_fp32_param,
                             safe_get_local_grad, safe_get_local_optimizer_state, safe_set_full_fp32_param,
                             safe_set_full_optimizer_state)
from deepspeed.runtime.zero.linear import LinearFunctionForZeroStage3
from torch import nn

from spt_dist.engines.base import ADAM_STATE, Engine, EngineSpec


def _linear_as_torch_computes_it(input, weight, bias=None):  # noqa: A002 - DeepSpeed's argument names
    """ZeRO-3's memory-efficient linear, forward: the arithmetic of torch's own F.linear (aten::linear), so that
    ZeRO-3 gives the other engines' results bit for bit. DeepSpeed adds the bias after the matrix product of a
    3-D input; torch fuses it (addmm over the flattened input), which rounds differently once biases are
    non-zero (a pretrained checkpoint). DeepSpeed's backward already matches torch's."""
    if bias is not None and (input.dim() == 2 or (input.is_contiguous() and bias.dim() == 1)):
        out = torch.addmm(bias, input.reshape(-1, input.shape[-1]), weight.t())
        return out.view(*input.shape[:-1], out.shape[-1])
    output = input.matmul(weight.t())
    if bias is not None:
        output += bias
    return output


if "setup_context" in vars(LinearFunctionForZeroStage3):  # the forward without ctx (DeepSpeed >= 0.16's form)
    LinearFunctionForZeroStage3.forward = staticmethod(_linear_as_torch_computes_it)


class DeepSpeedEngine(Engine):
    def __init__(self, model: nn.Module, spec: EngineSpec) -> None:
        deepspeed.utils.logger.setLevel(logging.WARNING)
        bf16 = spec.engine.precision == "bf16"
        config = {
            "train_micro_batch_size_per_gpu": spec.micro_batch_size,
            "gradient_accumulation_steps": spec.optim.grad_accum,
            # Explicit: DeepSpeed's default clips at 1.0, which would differ from every other engine.
            "gradient_clipping": spec.optim.grad_clip,
            "zero_optimization": {"stage": spec.engine.zero_stage},
            "bf16": {"enabled": bf16},
            # Our AdamW is a client optimizer; under ZeRO it steps on flat fp32 partitions, which is exact
            # because AdamW is elementwise.
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,
        }
        # The model is built normally (not under zero.Init, which would discard timm's init); initialize()
        # moves it to the device and, at stage 3, partitions it.
        optimizer = spec.optimizer(model)
        # Every rank would print the same notes (the CPU comm op "built successfully"): rank 0 speaks for all.
        with contextlib.redirect_stdout(io.StringIO()) if dist.get_rank() else contextlib.nullcontext():
            self._engine, _, _, self._scheduler = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=spec.scheduler,
                config=config)
        self.module = self._engine
        self.input_dtype = torch.bfloat16 if bf16 else torch.float32
        _unlink_shared_memory()

    def backward(self, loss: torch.Tensor) -> None:
        self._engine.backward(loss)

    def step(self) -> bool:
        boundary = self._engine.is_gradient_accumulation_boundary()
        self._engine.step()
        return boundary

    @staticmethod
    def _own_part(param: nn.Parameter, rank: int, world: int) -> tuple[str, int, int] | None:
        """Where this rank's own part of a trainable parameter lies: (how it is held, flat start, entries), or
        None when it holds none. `zero3`: its flat partition of ceil(numel / world) entries, zero-padded at the
        end; `fragment` (ZeRO-1/2 and the bf16 optimizer): the parameter's fragment inside this rank's flat
        optimizer partition; `slice` (ZeRO-0 in fp32: every rank holds it all): an equal slice each."""
        if hasattr(param, "ds_id"):
            size = param.ds_tensor.ds_numel
            start = min(rank * size, param.ds_numel)
            return "zero3", start, max(0, min(size, param.ds_numel - start))
        if hasattr(param, "_hp_mapping"):
            if param._hp_mapping is None:
                return None
            address = param._hp_mapping.lp_fragment_address
            return "fragment", address.start, address.numel
        size = math.ceil(param.numel() / world)
        start = min(rank * size, param.numel())
        return "slice", start, max(0, min(size, param.numel() - start))

    def local_gradients(self) -> Iterator[tuple[str, int, torch.Tensor]]:
        rank, world = dist.get_rank(), dist.get_world_size()
        for name, param in self._engine.module.named_parameters():
            own = self._own_part(param, rank, world) if param.requires_grad else None
            if own is None:
                continue
            kind, start, count = own
            if kind == "zero3":
                grad = safe_get_local_grad(param).view(-1)[:count]
            elif kind == "fragment":
                # The same view deepspeed's safe_get_full_grad reads before its all-reduce.
                grad = param._hp_mapping.get_lp_grad_fragment(param._index_in_param_group).reshape(-1)
                if grad.numel() == param.numel() and count != param.numel():
                    grad = grad.narrow(0, start, count)
            else:  # every rank holds the whole all-reduced gradient
                grad = param.grad.view(-1)[start : start + count]
            yield name, start, grad.float()

    def lr(self) -> float:
        return self._scheduler.get_last_lr()[0]

    def optimizer(self) -> torch.optim.Optimizer:
        wrapper = self._engine.optimizer
        return getattr(wrapper, "optimizer", wrapper)  # ZeRO 1-3 wrap the client optimizer

    def full_state_dict(self, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        out = {}
        for name, param in self._engine.module.named_parameters():
            if trainable_only and not param.requires_grad:
                continue
            full = safe_get_full_fp32_param(param) if param.requires_grad else None  # collective at stage 3
            if full is None and hasattr(param, "ds_id"):  # a frozen stage-3 parameter: gather its shards
                with deepspeed.zero.GatheredParameters([param]):
                    full = param.detach().clone()
            out[name] = (param.detach() if full is None else full).float().cpu().clone()
        return out

    def scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        return self._scheduler

    def _trainable(self) -> Iterator[tuple[str, nn.Parameter, bool]]:
        """(name, parameter, whether ZeRO or the bf16 optimizer partitions its state) per trainable parameter."""
        for name, param in self._engine.module.named_parameters():
            if param.requires_grad:
                yield name, param, hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")

    def restore_master_weights(self, weights: dict[str, torch.Tensor]) -> None:
        if self.input_dtype == torch.float32:
            return  # fp32: the masters were copied from the loaded module weights, exactly
        for name, param, partitioned in self._trainable():
            if partitioned:
                safe_set_full_fp32_param(param, weights[name].to(param.device))

    def _link_state_fragments(self) -> None:
        """ZeRO-1/2 and the bf16 optimizer give each parameter views of its fragment of the optimizer state
        (what safe_get/set_full_optimizer_state read and write) only on some code paths; link them now."""
        wrapper = self._engine.optimizer
        if hasattr(wrapper, "_lazy_init_hp_params_optimizer_state"):
            wrapper._hp_optimizer_states_linked = False
            wrapper._lazy_init_hp_params_optimizer_state()

    def optimizer_state(self) -> tuple[dict[str, dict[str, torch.Tensor]], int]:
        client = self.optimizer()
        if not client.state:  # no step taken yet
            return {}, 0
        self._link_state_fragments()
        out = {}
        for name, param, partitioned in self._trainable():
            if partitioned:  # each rank's fragment, assembled by an all-reduce
                out[name] = {k: safe_get_full_optimizer_state(param, k).float().cpu() for k in ADAM_STATE}
            else:  # ZeRO-0 in fp32: the client optimizer steps the module's own parameters
                out[name] = {k: client.state[param][k].float().cpu().clone() for k in ADAM_STATE}
        return out, _step_count(client)

    def local_state(self) -> tuple[dict[str, torch.Tensor], dict[str, list], int]:
        """The fp32 master weights and AdamW state of this rank's own part of each parameter (`_own_part`)."""
        rank, world = dist.get_rank(), dist.get_world_size()
        client = self.optimizer()
        stepped = bool(client.state)
        if stepped:
            self._link_state_fragments()
        tensors, layout = {}, {}
        for name, param in self._engine.module.named_parameters():
            own = self._own_part(param, rank, world) if param.requires_grad else None
            if own is None or own[2] == 0:
                continue
            kind, start, count = own
            if kind == "zero3":
                parts = {"param": safe_get_local_fp32_param(param)}
                if stepped:
                    parts.update({k: safe_get_local_optimizer_state(param, k) for k in ADAM_STATE})
            elif kind == "fragment":
                parts = {"param": param._hp_mapping.get_hp_fragment()}
                if stepped:
                    parts.update({k: param._hp_mapping.get_optim_state_fragment(k) for k in ADAM_STATE})
            else:
                parts = {"param": param.detach()}
                if stepped:
                    parts.update({k: client.state[param][k] for k in ADAM_STATE})
                parts = {k: v.reshape(-1)[start:] for k, v in parts.items()}
            layout[name] = [start, list(param.ds_shape if kind == "zero3" else param.shape)]
            tensors.update({f"{name}/{k}": v.reshape(-1)[:count].float().cpu().clone() for k, v in parts.items()})
        return tensors, layout, _step_count(client) if stepped else 0

    def load_optimizer_state(self, state: dict[str, dict[str, torch.Tensor]], step: int) -> None:
        client = self.optimizer()
        # ZeRO-3 puts its flat fp32 partitions into the client's param groups only while stepping.
        flat = getattr(self._engine.optimizer, "fp32_partitioned_groups_flat", None)
        _init_adam_state(client, flat or [p for group in client.param_groups for p in group["params"]], step)
        self._link_state_fragments()
        for name, param, partitioned in self._trainable():
            for key in ADAM_STATE:
                value = state[name][key].to(param.device)
                if partitioned:
                    safe_set_full_optimizer_state(param, value, key)
                else:
                    client.state[param][key].copy_(value)


def _unlink_shared_memory() -> None:
    """On CPU, DeepSpeed's comm op gives each rank of a one-node job a 66 MiB buffer in /dev/shm, which every
    rank maps while initialising, and never removes it: each job would leave its buffers behind. Once all ranks
    have mapped them (the barrier) the names are no longer needed; the memory lives on until the ranks exit."""
    own = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_" \
          f"{os.environ.get('MASTER_PORT')}_{dist.get_rank()}"
    dist.barrier()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(own)


def _init_adam_state(optimizer: torch.optim.Optimizer, tensors: list[torch.Tensor], step: int) -> None:
    """Creates AdamW's state for the tensors it steps as its first step would (it is lazy), at `step`."""
    for p in tensors:
        state = optimizer.state[p]
        for key in ADAM_STATE:
            if key not in state:
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] = torch.tensor(float(step))


def _step_count(optimizer: torch.optim.Optimizer) -> int:
    return max(int(state["step"]) for state in optimizer.state.values())
