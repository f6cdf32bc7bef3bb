"""Entry point for `accelerate launch scripts/finetune_glue.py ...` (same as `roformer finetune ...`)."""

import sys

from roformer.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
