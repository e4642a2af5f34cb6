"""Run under a launcher: spt_dist's training command, where rank FAIL_RANK alone meets a user error when it
writes a checkpoint's state.json (a file only rank 0 writes: as a full disk there would be).

usage: deepspeed --num_gpus 2 tests/workers/fail_on_rank.py --config ... key=value ...  (FAIL_RANK in the env)
"""

import os

from spt_dist import checkpoint
from spt_dist.errors import UserError
from spt_dist.train import run

_write_json = checkpoint.write_json


def _failing_write_json(path, obj):
    if os.environ.get("RANK") == os.environ["FAIL_RANK"]:
        raise UserError(f"cannot write '{path}': no space left on the device (injected on rank {os.environ['RANK']})")
    return _write_json(path, obj)


checkpoint.write_json = _failing_write_json
run()
