"""FLOPs per image and model FLOPs utilisation (MFU), counted the way torchtitan reports them.

FLOPs are counted by PyTorch's FlopCounterMode on a copy of the model built on the meta device: exact for
every matmul and attention of any supported family, no per-family code (a ViT-B/16 forward at 224 px is 35.1
GFLOPs, timm's 17.6 GMACs; Swin-B 30.9; EVA-02-L 162.0), free of memory and instant even for a ViT-g. A training step's FLOPs depend on what trains:
- full fine-tuning: forward + backward for activations and every weight (about 3x the forward);
- a frozen backbone with small trainable modules (LoRA, SPT, GPS): forward + backward for activations
  through the blocks (about 2x); the trainable tensors' own gradients are small next to that and not counted;
- linear probing: forward + the head's backward.
MFU = achieved training FLOP/s per device / the device's peak for the run's precision (dense, no sparsity).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from spt_dist.methods import get_method

# Dense peak TFLOP/s per device by precision, from the vendors' data sheets (SXM parts where both exist).
# fp32 is the plain FP32 rate: torch keeps TF32 matmuls off unless asked.
_PEAK_TFLOPS = (  # (substring of torch.cuda.get_device_name(), bf16, fp32)
    ("H200", 989.0, 67.0),
    ("H100 PCIe", 756.0, 51.0),
    ("H100", 989.0, 67.0),
    ("A100", 312.0, 19.5),
    ("L40S", 362.0, 91.6),
    ("A10G", 70.0, 31.2),
    ("V100", 125.0, 15.7),  # no bf16: its fp16 tensor-core rate
)


@dataclass(frozen=True)
class ModelFlops:
    forward: float  # FLOPs of one image's forward pass
    train: float  # FLOPs of one image's training step (forward + backward as the method runs it)


def count_flops(model_name: str, num_classes: int, method: str, img_size: int | None = None) -> ModelFlops:
    """FLOPs per image of `model_name` trained with `method` (a registered name; its `backward` says whether
    every weight trains, only the head, or modules on a frozen backbone; the trainer passes full for
    method.sparse_update=dense_masked, whose selected tensors train whole)."""
    from spt_dist.models import create_model  # noqa: PLC0415 - timm only when asked

    model = create_model(model_name, num_classes, img_size=img_size, device="meta")
    image = torch.empty(1, 3, *model.patch_embed.img_size, device="meta")
    with FlopCounterMode(display=False) as counter:
        model(image)
    forward = counter.get_total_flops()
    backward = get_method(method).backward
    model.requires_grad_(backward == "full")
    model.get_classifier().requires_grad_(True)
    # A frozen backbone still back-propagates through every block to reach its trainable modules: an input
    # that requires grad makes the count do the same.
    image.requires_grad_(backward == "frozen_backbone")
    with FlopCounterMode(display=False) as counter:
        model(image).sum().backward()
    return ModelFlops(forward=float(forward), train=float(counter.get_total_flops()))


def peak_tflops(device: torch.device, precision: str) -> float | None:
    """The device's dense peak TFLOP/s for `precision`, or None where unknown (CPUs, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, bf16, fp32 in _PEAK_TFLOPS:
        if key in name:
            return bf16 if precision == "bf16" else fp32
    return None
