"""Entry point: `deepspeed launch/train.py --config configs/demo.yaml [key=value ...]` (see spt_dist/train.py;
the same as `torchrun … -m spt_dist.train` and the `spt-train` command)."""

from spt_dist.train import run

if __name__ == "__main__":
    run()
