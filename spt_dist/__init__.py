"""spt_dist: sensitivity-aware parameter-efficient fine-tuning of timm ViTs under DeepSpeed and FSDP2."""

__version__ = "0.1.0"
