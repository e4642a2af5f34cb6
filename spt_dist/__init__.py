"""spt_dist: sensitivity-aware parameter-efficient fine-tuning of timm ViTs under DeepSpeed and FSDP2.

The library (spt_dist.api): `score` -> `allocate` -> `get_peft_model` (a `PeftModel`), from your own loop.
Imported on first use, so `import spt_dist` stays light (the Slurm launcher imports no torch).
"""

__version__ = "0.1.0"

_API = ("score", "allocate", "get_peft_model", "PeftModel", "Scores", "Allocation")
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        from spt_dist import api  # noqa: PLC0415

        return getattr(api, name)
    raise AttributeError(f"module 'spt_dist' has no attribute {name!r}")
