"""Entry point for `python scripts/evaluate_bleu.py ...` (same as `roformer evaluate-bleu ...`)."""

import sys

from roformer.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate-bleu", *sys.argv[1:]]))
