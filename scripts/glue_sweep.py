"""Entry point for `accelerate launch scripts/glue_sweep.py ...` (same as `roformer glue-sweep ...`)."""

import sys

from roformer.cli import main

if __name__ == "__main__":
    sys.exit(main(["glue-sweep", *sys.argv[1:]]))
