"""The `roformer` command. Each subcommand parses its arguments and calls the library.

Mistakes a person can make (bad config, bad data, a sequence too long) end with exit status 2 and one line
on stderr that names the file or key, never a traceback.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from roformer.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def _training_command(task: str):
    def run(args) -> int:
        from roformer.config import load_config
        from roformer.trainer import TrainingDiverged, train

        cfg = load_config(args.config, args.overrides)
        if cfg.task != task:
            raise UserError(f"{args.config}: task={cfg.task!r}, but this command trains task={task!r}")
        try:
            results = train(cfg)
        except TrainingDiverged as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        if results.get("status") != "interrupted":
            print(f"done: {cfg.output_dir}/final and {cfg.output_dir}/eval_results.json")
        return 0

    return run


def compare_command(args) -> int:
    from roformer.compare import compare_runs

    print(compare_runs(args.runs, args.out))
    if args.out:
        print(f"plot: {args.out}")
    return 0


def convert_command(args) -> int:
    """Ours -> transformers or transformers -> ours, decided by what the source directory holds."""
    from roformer.interop import from_transformers, to_transformers
    from roformer.modeling import MODEL_CLASSES, load_pretrained, read_model_meta

    src, dst = Path(args.source), Path(args.dest)
    if not (src / "config.json").is_file():
        raise UserError(f"{src}: no config.json here (expected a model directory)")
    if read_model_meta(src).get("architecture") in MODEL_CLASSES:
        hf_model = to_transformers(load_pretrained(src))
        hf_model.save_pretrained(dst)
        direction = f"{type(hf_model).__name__} (transformers)"
    else:
        import transformers

        hf_config = transformers.AutoConfig.from_pretrained(src)
        name = (hf_config.architectures or ["?"])[0]
        if not hasattr(transformers, name):
            raise UserError(f"{src}: unknown transformers architecture {name!r}")
        model = from_transformers(getattr(transformers, name).from_pretrained(src))
        model.save_pretrained(dst)
        direction = f"{type(model).__name__} (roformer)"
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    print(f"wrote {dst} as {direction}")
    return 0


def demo_command(args) -> int:
    from roformer.demo import run_demo

    run_demo(args.output_dir, args.config, args.schemes, args.overrides)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="roformer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    for name, task, help_text in (
        ("pretrain", "mlm", "masked-LM pretraining"),
        ("finetune", "glue", "GLUE fine-tuning"),
        ("translate", "translation", "translation training (WMT14 En-De, Multi30k)"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", required=True, help="a YAML recipe from configs/")
        p.add_argument("overrides", nargs="*", help="dotted key=value pairs, e.g. model.position=sinusoidal")
        p.set_defaults(func=_training_command(task))

    p = sub.add_parser("compare", help="table and plot of run directories")
    p.add_argument("runs", nargs="+", help="run directories (output_dir of each run)")
    p.add_argument("--out", help="where to write the plot (PNG)")
    p.set_defaults(func=compare_command)

    p = sub.add_parser("convert", help="convert a model directory to or from transformers")
    p.add_argument("source", help="a final/ directory of a run, or a transformers RoFormer/BERT checkpoint")
    p.add_argument("dest")
    p.set_defaults(func=convert_command)

    p = sub.add_parser("demo", help="pretrain rotary, sinusoidal and learned on the built-in corpus and compare")
    p.add_argument("--output_dir", default="runs/demo")
    p.add_argument("--config", default=None, help="recipe (default: configs/pretrain/demo.yaml)")
    p.add_argument("--schemes", nargs="+", default=["rotary", "sinusoidal", "learned"])
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=demo_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
