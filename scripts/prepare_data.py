"""Entry point for `python scripts/prepare_data.py --config RECIPE --out DIR` (same as `roformer prepare ...`)."""

import sys

from roformer.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
