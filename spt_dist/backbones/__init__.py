"""Backbone families (one `BackboneSpec` each): ViT (and DeiT, DINOv2, CLIP ViTs), Swin, EVA-02."""

from spt_dist.backbones.base import BackboneSpec, backbones, register_backbone, spec_for, spec_for_name

__all__ = ["BackboneSpec", "backbones", "register_backbone", "spec_for", "spec_for_name"]
