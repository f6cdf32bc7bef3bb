"""Entry point for `accelerate launch scripts/pretrain.py ...` (same as `roformer pretrain ...`)."""

import sys

from roformer.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
