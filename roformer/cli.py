"""The `roformer` command. Each subcommand parses its arguments and calls the library.

Mistakes a person can make (bad config, bad data, a sequence too long) end with exit status 2 and one line
on stderr that names the file or key, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from roformer.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


class _PositionSchemes:
    """argparse choices: the registered position schemes, read (with torch) only when a choice is checked."""

    def __iter__(self):
        from roformer.positions import POSITION_SCHEMES

        return iter(POSITION_SCHEMES)

    def __contains__(self, name) -> bool:
        return name in list(self)


TRAINING = (
    ("pretrain", "mlm", "masked-LM pretraining"),
    ("finetune", "glue", "GLUE fine-tuning"),
    ("translate", "translation", "translation training (WMT14 En-De, Multi30k)"),
)
TRAINING_TASKS = {name: task for name, task, _ in TRAINING}


def load_training_config(args):
    """The recipe of a training command with its overrides; a recipe for another task is refused."""
    from roformer.config import load_config

    cfg, task = load_config(args.config, args.overrides), TRAINING_TASKS[args.command]
    if cfg.task != task:
        raise UserError(f"{args.config}: task={cfg.task!r}, but this command trains task={task!r}")
    return cfg


def training_command(args) -> int:
    """pretrain, finetune, translate: train the recipe."""
    from roformer.trainer import Interrupted, TrainingDiverged, train

    cfg = load_training_config(args)
    try:
        results = train(cfg)
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except Interrupted as err:  # outside the training loop: nothing new to save
        print(f"{err}; nothing saved since the last checkpoint", file=sys.stderr)
        return 130
    if results.get("status") != "interrupted" and int(os.environ.get("RANK", "0")) == 0:  # once, not per process
        print(f"done: {cfg.output_dir}/final and {cfg.output_dir}/eval_results.json")
    return 0


def compare_command(args) -> int:
    from roformer.compare import compare_runs
    from roformer.rundir import check_writable_file

    if args.out:
        check_writable_file(args.out, "--out")
    print(compare_runs(args.runs, args.out, args.at_steps))
    if args.out:
        print(f"plot: {args.out}")
    return 0


def convert_command(args) -> int:
    """Ours -> transformers or transformers -> ours, decided by what the source directory holds."""
    from roformer.interop import from_transformers, to_transformers
    from roformer.modeling import MODEL_CLASSES, load_pretrained, read_model_meta
    from roformer.rundir import check_model_dir

    src, dst = Path(args.source), Path(args.dest)
    if not (src / "config.json").is_file():
        raise UserError(f"{src}: no config.json here (expected a model directory)")
    check_model_dir(dst)
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


def evaluate_bleu_command(args) -> int:
    import json

    from roformer.bleu import check_generation_args, evaluate_bleu, format_scores, resolve_device
    from roformer.config import GenerationConfig
    from roformer.rundir import check_writable_file

    given = dict(beam_size=args.beam, length_penalty=args.lenpen, max_len_a=args.max_len_a, max_len_b=args.max_len_b)
    settings = {**vars(GenerationConfig()), **{name: value for name, value in given.items() if value is not None}}
    # every number and output place is checked before hours of decoding, named as on the command line
    check_generation_args(
        settings["beam_size"], settings["max_len_a"], settings["max_len_b"], args.batch_size, settings["length_penalty"]
    )
    generation = GenerationConfig(**settings)
    if args.hyp is None:
        resolve_device(args.device)
    for flag, path in (("--out", args.out), ("--json", args.json)):
        if path:
            check_writable_file(path, flag)
    scores = evaluate_bleu(
        args.src,
        args.ref,
        checkpoint=args.checkpoint,
        hyp=args.hyp,
        out=args.out,
        device=args.device,
        generation=generation,
        batch_size=args.batch_size,
    )
    if args.out:
        print(f"wrote {scores['sentences']} translations to {args.out}")
    print(format_scores(scores))
    if args.json:
        Path(args.json).write_text(json.dumps(scores, indent=2))
    return 0


def average_checkpoints_command(args) -> int:
    from roformer.checkpointing import write_averaged_model
    from roformer.rundir import check_model_dir

    check_model_dir(args.out, "--out")
    out = write_averaged_model(args.checkpoints, args.out, args.like)
    print(f"wrote the mean weights of {len(args.checkpoints)} checkpoints to {out}")
    return 0


def demo_command(args) -> int:
    from roformer.demo import compare_schemes

    compare_schemes(args.output_dir, args.config, args.schemes, args.seeds, args.overrides)
    return 0


def extrapolate_command(args) -> int:
    from roformer.extrapolation import evaluate_lengths, format_rows, plot_rows
    from roformer.rundir import check_writable_file

    if args.out:  # before the evaluations
        check_writable_file(args.out, "--out")
    rows = evaluate_lengths(args.runs, args.factors, args.scalings, args.max_tokens)
    print(format_rows(rows))
    if args.out:
        print(f"plot: {plot_rows(rows, args.out)}")
    return 0


def train_tokenizer_command(args) -> int:
    from roformer.demo import train_shared_tokenizer
    from roformer.rundir import check_model_dir

    check_model_dir(args.out, "--out")  # not a file; a tokenizer that runs may share is never replaced
    print(f"wrote {train_shared_tokenizer(args.config, args.out, args.overrides)}")
    return 0


def prepare_command(args) -> int:
    """A recipe's data section -> a prepared dataset in --out (resumed if interrupted there; kept if finished)."""
    import importlib

    from roformer.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.num_proc is not None and args.num_proc < 1:
        raise UserError(f"--num_proc={args.num_proc}: must be at least 1")
    if cfg.task not in PREPARERS:
        raise UserError(f"{args.config}: task={cfg.task!r} has no data to prepare; expected {' or '.join(PREPARERS)}")
    module, _, function = PREPARERS[cfg.task].partition(":")
    dataset = getattr(importlib.import_module(module), function)(cfg.data, args.out, num_proc=args.num_proc)
    counts = ", ".join(f"{split}: {c['tokens']:,} tokens" for split, c in dataset.manifest["counts"].items())
    print(f"prepared {dataset.path} ({counts}); train with data.prepared={dataset.path}")
    return 0


PREPARERS = {"mlm": "roformer.tasks.mlm:prepare_corpus", "translation": "roformer.tasks.translation:prepare_parallel"}


def glue_sweep_command(args) -> int:
    from roformer.glue_sweep import run_glue_sweep

    run_glue_sweep(args.tasks, args.learning_rates, args.seeds, args.output_root, args.config_dir, args.overrides)
    return 0


def glue_table_command(args) -> int:
    from roformer.glue_table import format_glue_table

    print(format_glue_table(args.roots))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="roformer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    parser.commands = sub.choices  # name -> its parser, for `roformer launch`

    for name, _, help_text in TRAINING:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", required=True, help="a YAML recipe from configs/")
        p.add_argument("overrides", nargs="*", help="dotted key=value pairs, e.g. model.position=sinusoidal")
        p.set_defaults(func=training_command)

    p = sub.add_parser("glue-sweep", help="the paper's GLUE protocol: learning rates x seeds, then its Table 2")
    p.add_argument("--tasks", nargs="+", default=["mrpc", "sst2", "qnli", "stsb", "qqp", "mnli"])
    p.add_argument("--learning_rates", nargs="+", type=float, default=[2e-5, 3e-5, 4e-5, 5e-5])
    p.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    p.add_argument("--config_dir", default="configs/glue", help="holds one recipe <task>.yaml per task")
    p.add_argument("--output_root", default="runs/glue_sweep", help="runs go to <root>/<task>/lr<lr>_seed<seed>")
    p.add_argument("overrides", nargs="*", help="dotted key=value pairs applied to every run")
    p.set_defaults(func=glue_sweep_command)

    p = sub.add_parser("glue-table", help="headline dev metrics of finished GLUE runs, one row per run root")
    p.add_argument("roots", nargs="+", help="directories holding <task>/eval_results.json")
    p.set_defaults(func=glue_table_command)

    p = sub.add_parser("compare", help="table and plot of run directories")
    p.add_argument("runs", nargs="+", help="run directories (output_dir of each run)")
    p.add_argument("--out", help="where to write the plot (PNG)")
    p.add_argument("--at-steps", dest="at_steps", nargs="+", type=int, help="also a per-scheme table at these steps")
    p.set_defaults(func=compare_command)

    p = sub.add_parser("convert", help="convert a model directory to or from transformers")
    p.add_argument("source", help="a final/ directory of a run, or a transformers RoFormer/BERT checkpoint")
    p.add_argument("dest")
    p.set_defaults(func=convert_command)

    p = sub.add_parser("evaluate-bleu", help="translate a file with a trained model and report BLEU")
    p.add_argument("--checkpoint", help="a translation run's final/ directory (model and tokenizer)")
    p.add_argument("--src", required=True, help="source sentences, one per line (raw text)")
    p.add_argument("--ref", required=True, help="reference translations, line-aligned with --src (raw text)")
    p.add_argument("--hyp", help="score these translations instead of translating with --checkpoint")
    p.add_argument("--out", help="write the translations here, one per line")
    p.add_argument("--json", help="write the scores and sacreBLEU signatures here as JSON")
    # decoding settings: unset ones keep GenerationConfig's defaults (roformer/config.py)
    p.add_argument("--beam", type=int, help="beam size (default 4, the paper's; 1 is greedy)")
    p.add_argument("--lenpen", type=float, help="length penalty, fairseq's convention (default 0.6, the paper's)")
    p.add_argument("--max_len_a", type=float, help="at most a * source length + b tokens (default 0, fairseq's)")
    p.add_argument("--max_len_b", type=int, help="(default 200, fairseq's)")
    p.add_argument("--batch_size", type=int, default=64, help="sentences per batch")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    p.set_defaults(func=evaluate_bleu_command)

    p = sub.add_parser("average-checkpoints", help="average the weights of checkpoints into a model directory")
    p.add_argument("checkpoints", nargs="+", help="checkpoint directories, e.g. RUN/checkpoints/step_*")
    p.add_argument("--out", required=True, help="where to write the averaged model (loadable like RUN/final)")
    p.add_argument("--like", help="model directory giving config and tokenizer (default: RUN/final)")
    p.set_defaults(func=average_checkpoints_command)

    p = sub.add_parser("demo", help="pretrain one model per position scheme (and seed) and compare them")
    p.add_argument("--output_dir", default="runs/demo")
    p.add_argument("--config", default=None, help="MLM recipe (default: configs/pretrain/demo.yaml, built-in corpus)")
    p.add_argument("--schemes", nargs="+", default=["rotary", "sinusoidal", "learned"], choices=_PositionSchemes())
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="one run per scheme and seed")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=demo_command)

    p = sub.add_parser("extrapolate", help="MLM loss of pretrained runs at 1x, 2x, 4x, 8x their training length")
    p.add_argument("runs", nargs="+", help="pretraining run directories")
    p.add_argument("--factors", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument(
        "--scalings",
        nargs="+",
        default=["none", "linear", "ntk", "dynamic_ntk", "yarn"],
        help="RoPE scalings to try on rotary runs",
    )
    p.add_argument("--max_tokens", type=int, default=16384, help="evaluation tokens per length")
    p.add_argument("--out", help="where to write the plot (PNG)")
    p.set_defaults(func=extrapolate_command)

    p = sub.add_parser("prepare", help="tokenize a recipe's corpus once into memory-mapped shards that runs share")
    p.add_argument("--config", required=True, help="an MLM or translation recipe; its data section names the sources")
    p.add_argument("--out", required=True, help="the prepared dataset's directory")
    p.add_argument("--num_proc", type=int, default=None, help="tokenizing processes (default: all cores)")
    p.add_argument("overrides", nargs="*", help="dotted key=value pairs, e.g. data.max_seq_length=512")
    p.set_defaults(func=prepare_command)

    p = sub.add_parser("train-tokenizer", help="train an MLM recipe's WordPiece tokenizer once, to share it")
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=train_tokenizer_command)

    # only listed here: main() hands `launch` its words unparsed (they are accelerate's options, then a command)
    sub.add_parser("launch", help="accelerate launch, after checking its config file and the command: see launch -h")
    return parser


NUMBER_RULES = {
    "learning_rates": ("--learning_rates", lambda v: v > 0, "positive"),
    "seeds": ("--seeds", lambda v: v >= 0, "at least 0"),
    "factors": ("--factors", lambda v: v >= 1, "at least 1"),
    "max_tokens": ("--max_tokens", lambda v: v >= 1, "at least 1"),
    "at_steps": ("--at-steps", lambda v: v >= 0, "at least 0"),
}
"""Numeric arguments of the subcommands other than evaluate-bleu (see roformer.bleu.check_generation_args)."""


def check_numbers(args) -> None:
    """The same one-line refusal for a bad number on the command line as for a bad config value."""
    for dest, (flag, ok, allowed) in NUMBER_RULES.items():
        values = getattr(args, dest, None)
        for value in values if isinstance(values, list) else [values] if values is not None else []:
            if not ok(value):
                raise UserError(f"{flag}={value}: must be {allowed}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["launch"]:
        from roformer.launch import main as launch

        try:
            return launch(argv[1:])
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    try:
        check_numbers(args)
        return args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
