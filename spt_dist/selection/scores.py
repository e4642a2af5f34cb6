"""Per-rank sensitivity scores: one fp32 score for each entry of this rank's own shard of each scored tensor.

Stored in the run directory as `scores/rank-RRRRR-of-WWWWW.safetensors` (one file per rank of the score
pass, tensors keyed '<parameter>@<flat offset>') plus `scores/scores.json`. Allocation may run at any
world size: a rank loads files r, r + W, r + 2W, ...; the allocation only needs the ranks' pieces to be
disjoint and to cover every scored entry once, which `check_coverage` verifies.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from safetensors import safe_open

from spt_dist import runfiles
from spt_dist.atomic import write_json, write_safetensors
from spt_dist.distributed import all_reduce_
from spt_dist.data.shards import read_json
from spt_dist.errors import UserError
from spt_dist.selection.layout import Layout

INDEX_FILE = "scores.json"


@dataclass
class Chunk:
    tensor: str
    start: int  # flat offset of values[0] within the tensor
    values: torch.Tensor  # 1-D fp32


@dataclass
class LocalScores:
    chunks: list[Chunk] = field(default_factory=list)
    _where: dict[tuple[str, int], Chunk] = field(default_factory=dict, repr=False)

    def add_gradient(self, tensor: str, start: int, grad: torch.Tensor, square: bool) -> None:
        """Accumulates s += g*g (SPT) or s += g (GPS: |sum g| is taken by `finish`) on the rank's shard."""
        chunk = self._where.get((tensor, start))
        if chunk is None:
            chunk = Chunk(tensor, start, torch.zeros(grad.numel(), dtype=torch.float32, device=grad.device))
            self._where[(tensor, start)] = chunk
            self.chunks.append(chunk)
        if square:
            chunk.values.addcmul_(grad, grad)
        else:
            chunk.values.add_(grad)

    def finish(self, absolute: bool) -> None:
        for chunk in self.chunks:
            if absolute:
                chunk.values.abs_()
            chunk.values = chunk.values.cpu()

    @property
    def numel(self) -> int:
        return sum(c.values.numel() for c in self.chunks)

    def sorted(self, layout: Layout) -> list[Chunk]:
        """Chunks in canonical global index order."""
        return sorted(self.chunks, key=lambda c: layout.tensor(c.tensor).offset + c.start)


def check_coverage(scores: LocalScores, layout: Layout) -> None:
    """Every scored entry held by exactly one rank (collective)."""
    counts = torch.zeros(len(layout.tensors), dtype=torch.int64)
    index = {t.name: i for i, t in enumerate(layout.tensors)}
    for c in scores.chunks:
        if c.tensor not in index:
            raise UserError(f"scores: '{c.tensor}' is not a scored tensor of this model and selection.method")
        counts[index[c.tensor]] += c.values.numel()
    all_reduce_(counts)
    for t, n in zip(layout.tensors, counts.tolist()):
        if n != t.numel:
            raise UserError(f"scores: {n} scores for '{t.name}' ({t.numel} entries): the score files do not "
                            "match this model; run the score stage again")


def save_scores(scores: LocalScores, run_dir: str, rank: int, world: int, info: dict) -> None:
    """Collective: each rank writes its file, then rank 0 the index (written last: its presence means complete)."""
    directory = os.path.join(run_dir, runfiles.SCORES)
    os.makedirs(directory, exist_ok=True)
    tensors = {f"{c.tensor}@{c.start}": c.values.contiguous() for c in scores.chunks}
    write_safetensors(os.path.join(directory, f"rank-{rank:05d}-of-{world:05d}.safetensors"), tensors,
                      {"method": info["method"]})
    dist.barrier()
    if rank == 0:
        write_json(os.path.join(directory, INDEX_FILE), dict(info, world_size=world))
    dist.barrier()


def read_index(run_dir: str) -> dict:
    path = os.path.join(run_dir, runfiles.SCORES, INDEX_FILE)
    index = read_json(path)
    if index is None:
        raise UserError(f"no scores in '{os.path.dirname(path)}': run `--stage score` first with the same "
                        "output.dir and output.name")
    return index


def load_scores(run_dir: str, rank: int, world: int) -> tuple[LocalScores, dict]:
    """This rank's share of the score files of a finished score pass (any world size then and now)."""
    index = read_index(run_dir)
    saved_world = int(index["world_size"])
    scores = LocalScores()
    for file_rank in range(rank, saved_world, world):
        path = os.path.join(run_dir, runfiles.SCORES, f"rank-{file_rank:05d}-of-{saved_world:05d}.safetensors")
        if not os.path.isfile(path):
            raise UserError(f"scores: '{path}' is missing; run the score stage again")
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                tensor, _, start = key.rpartition("@")
                scores.chunks.append(Chunk(tensor, int(start), f.get_tensor(key)))
    return scores, index


def _rank_file(rank: int, world: int) -> str:
    return f"rank-{rank:05d}-of-{world:05d}.safetensors"


def save_partial_scores(scores: LocalScores, run_dir: str, rank: int, world: int, progress: dict) -> None:
    """Collective: the scores so far and this rank's `progress` (JSON), replacing the previous partial save
    as a whole: written to scores/.partial-new, then renamed (the old one moved aside first, removed last)."""
    root = os.path.join(run_dir, runfiles.SCORES)
    partial = runfiles.PARTIAL_SCORES
    new, final, old = (os.path.join(root, n) for n in (".partial-new", partial, partial + ".old"))
    if rank == 0:
        shutil.rmtree(new, ignore_errors=True)
        os.makedirs(new)
    dist.barrier()
    tensors = {f"{c.tensor}@{c.start}": c.values.detach().cpu().contiguous() for c in scores.chunks}
    write_safetensors(os.path.join(new, _rank_file(rank, world)), tensors, {"progress": json.dumps(progress)})
    dist.barrier()
    if rank == 0:
        if os.path.isdir(final):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(new, final)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_partial_scores(run_dir: str, rank: int, world: int, device: torch.device) -> tuple[LocalScores, dict] | None:
    """This rank's partial scores and progress, if a partial save of a `world`-rank pass exists."""
    for name in (runfiles.PARTIAL_SCORES, runfiles.PARTIAL_SCORES + ".old"):  # .old: killed between the renames
        path = os.path.join(run_dir, runfiles.SCORES, name, _rank_file(rank, world))
        if os.path.isfile(path):
            scores = LocalScores()
            with safe_open(path, framework="pt") as f:
                progress = json.loads(f.metadata()["progress"])
                for key in f.keys():
                    tensor, _, start = key.rpartition("@")
                    chunk = Chunk(tensor, int(start), f.get_tensor(key).to(device))
                    scores.chunks.append(chunk)
                    scores._where[(tensor, int(start))] = chunk
            return scores, progress
    return None


def remove_partial_scores(run_dir: str) -> None:
    for name in (runfiles.PARTIAL_SCORES, runfiles.PARTIAL_SCORES + ".old", ".partial-new"):
        shutil.rmtree(os.path.join(run_dir, runfiles.SCORES, name), ignore_errors=True)
