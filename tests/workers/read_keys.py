"""Run under torchrun (gloo, CPU): read train/eval keys of this rank and write them as JSON.

usage: torchrun --nproc_per_node 2 tests/workers/read_keys.py TRAIN_SPEC EVAL_SPEC BATCH BATCHES WORKERS OUTDIR
"""

import argparse
import json
import os

import numpy as np
import torch
import torch.distributed as dist

from spt_dist.data.loader import EvalStream, TrainStream, expand_shards, read_classes


def to_tensor(img):
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)


def main() -> None:
    p = argparse.ArgumentParser()
    for name in ("train", "eval"):
        p.add_argument(name)
    for name in ("batch_size", "batches", "workers"):
        p.add_argument(name, type=int)
    p.add_argument("outdir")
    a = p.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    train = expand_shards(a.train, "data.train_shards")
    num_classes = len(read_classes(train))
    stream = TrainStream(train, rank=rank, world=world, batch_size=a.batch_size, transform=to_tensor,
                         num_classes=num_classes, seed=0, workers=a.workers, shuffle_buffer=50)
    train_keys = [k for _ in range(a.batches) for k in next(stream)["keys"]]
    stream.close()
    evals = EvalStream(expand_shards(a.eval, "data.eval_shards"), rank=rank, world=world, batch_size=a.batch_size,
                       transform=to_tensor, num_classes=num_classes, workers=a.workers)
    eval_keys = [k for batch in evals for k in batch["keys"]]

    with open(os.path.join(a.outdir, f"keys-rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "train_keys": train_keys, "eval_keys": eval_keys}, f)
    dist.barrier()  # a rank that died shows up as a failed job, not a missing file
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
