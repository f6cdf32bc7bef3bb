"""Entry point for `accelerate launch scripts/train_translation.py ...` (same as `roformer translate ...`)."""

import sys

from roformer.cli import main

if __name__ == "__main__":
    sys.exit(main(["translate", *sys.argv[1:]]))
