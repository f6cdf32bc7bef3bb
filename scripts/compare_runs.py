"""Entry point for `accelerate launch scripts/compare_runs.py ...` (same as `roformer compare ...`)."""

import sys

from roformer.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
