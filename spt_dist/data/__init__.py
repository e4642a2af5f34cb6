"""Data pipeline: webdataset shard writer (`shards`, torch-free CLI) and rank-sharded streams (`loader`).

Names are re-exported lazily so `python -m spt_dist.data.shards` does not pay for importing torch.
"""

_EXPORTS = {
    "write_split": "shards",
    "write_classes": "shards",
    "expand_shards": "loader",
    "count_samples": "loader",
    "read_classes": "loader",
    "FaultCounter": "loader",
    "TrainStream": "loader",
    "EvalStream": "loader",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
