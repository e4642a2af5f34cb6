"""Top-1 over the whole eval split: each rank its own shards, counts summed over the ranks."""

from __future__ import annotations

from collections.abc import Callable

import torch

from spt_dist.distributed import all_reduce_sum
from spt_dist.engines.base import Engine


class Evaluator:
    """`stop`: whether this rank was asked to stop (a signal); checked with every batch, so that an evaluation
    longer than a launcher's grace period does not cost the run everything since its last checkpoint."""

    def __init__(self, engine: Engine, stream, input_size: tuple[int, int], device: torch.device,
                 stop: Callable[[], bool] = lambda: False) -> None:
        self.engine, self.stream, self.device, self.stop = engine, stream, device, stop
        self._placeholder = torch.zeros(1, 3, *input_size)

    @torch.no_grad()
    def __call__(self) -> dict[str, float] | None:
        """Top-1 and the sample count, or None when a rank was asked to stop (every rank gives up together).

        Ranks step in lockstep: one whose shards are exhausted runs a throwaway forward while others still
        have batches, because under ZeRO-3/FSDP every forward is a collective (parameter all-gathers)."""
        self.engine.eval()
        correct = seen = 0.0
        batches = iter(self.stream)
        while True:
            batch = next(batches, None)
            anyone_has_batch, stopping = all_reduce_sum([float(batch is not None), float(self.stop())])
            if stopping:
                batches.close()  # the stream's workers stop now
                self.engine.train()
                return None
            if not anyone_has_batch:
                break
            images = self._placeholder if batch is None else batch["images"]
            logits = self.engine.module(images.to(self.device, self.engine.input_dtype))
            if batch is not None:
                labels = batch["labels"].to(self.device)
                correct += (logits.argmax(-1) == labels).sum().item()
                seen += len(labels)
        correct, seen = all_reduce_sum([correct, seen])
        self.engine.train()
        return {"top1": 100.0 * correct / max(seen, 1.0), "samples": seen}
