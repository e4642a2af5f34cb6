"""Scaling studies: `python launch/sweep.py sweeps/tiny.yaml` (the same as `spt-sweep`; see spt_dist/sweep.py)."""

import sys

from spt_dist.sweep import main

if __name__ == "__main__":
    sys.exit(main())
