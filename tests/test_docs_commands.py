"""The shell commands README.md and docs/*.md tell a user to copy still work as written.

Every ```bash block in those files carries a marker on the line before it, an HTML comment a reader does not see:

    <!-- test: run [name=value ...] -->    each command runs, in order, at a tiny budget: the dotted overrides a
                                           user would add (TINY below) are appended; name=value binds the shell
                                           variables of a block written as a loop
    <!-- test: check [name=value ...] -->  paper scale (GPU, the hub, hours): the arguments parse, the recipe loads
                                           with every override (each key exists, each value fits), and when a path
                                           the command reads is missing, the command stops with exit status 2 and
                                           one line naming it
    <!-- test: skip: why -->               not run (make targets, benchmarks)

A plain ``` block preceded by `<!-- test: error -->` shows `$ command` lines and the error they print: the
command must exit with status 2 and print exactly that.

Each file runs in its own sandbox laid out like a fresh clone (configs/ and scripts/ of this checkout,
../shared/data beside it, no runs/), so commands see what a newcomer's would. Commands run in this process
through `roformer.cli.main`, which is what the `roformer` command, `python scripts/X.py` and `accelerate launch
scripts/X.py` all call (`roformer launch` runs `roformer.cli` under accelerate: here its config file is loaded and
the command runs in process).
"""

import glob
import re
import shlex
from pathlib import Path

import pytest

from roformer.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"<!--\s*test:\s*(run|check|skip|error)\b:?\s*(.*?)\s*-->")

SCRIPTS = {  # scripts/X.py -> the subcommand it runs
    "pretrain.py": "pretrain",
    "finetune_glue.py": "finetune",
    "train_translation.py": "translate",
    "glue_sweep.py": "glue-sweep",
    "evaluate_bleu.py": "evaluate-bleu",
    "compare_runs.py": "compare",
    "prepare_data.py": "prepare",  # the data-preparation branch's entry point
}
_MLM = [
    "data.max_documents=3",  # a WikiText article is ~3k tokens: the final evaluation reads the whole held-out part
    "data.tokenizer_vocab_size=500",
    "train.max_steps=2",
    "train.eval_every=2",
    "train.max_eval_batches=2",
    "train.log_every=1",
    "train.log_with=none",
]
_GLUE = [
    "train.num_epochs=null",
    "train.max_steps=2",
    "train.eval_every=2",
    "train.log_every=1",
    "train.log_with=none",
    "data.max_train_samples=32",
    "data.max_eval_samples=16",
    "data.max_seq_length=32",  # the test sets are predicted whole (RTE: 3,000 pairs)
    "data.tokenizer_vocab_size=500",
]
_TRANSLATION = [
    "train.max_steps=2",
    "train.eval_every=2",
    "train.save_every=2",
    "train.log_every=1",
    "train.log_with=none",
    "data.max_train_samples=200",
    "data.max_eval_samples=4",
    "data.bpe_vocab_size=300",
    "data.max_tokens=256",
]
TINY = {  # what a user appends for a quick try; later overrides win over the command's own
    "pretrain": _MLM,
    "demo": _MLM,
    "train-tokenizer": _MLM,
    "finetune": _GLUE,
    "translate": _TRANSLATION,
    "extrapolate": ["--factors", "1", "2", "--max_tokens", "256"],
}
RECIPE_COMMANDS = {"pretrain", "finetune", "translate", "train-tokenizer", "demo", "prepare"}


# --------------------------------------------------------------------------------------------------
# Reading the docs
# --------------------------------------------------------------------------------------------------


def blocks(path: Path) -> list[tuple[int, str, str, str, str]]:
    """Fenced blocks: (line, language, marker kind or '', marker arguments, body)."""
    lines, found, i = path.read_text().splitlines(), [], 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.search(before)
        kind, arguments = (marker.group(1), marker.group(2)) if marker else ("", "")
        found.append((i + 1, fence.group(1), kind, arguments, "\n".join(lines[i + 1 : end])))
        i = end + 1
    return found


def _expand_braces(word: str) -> list[str]:
    match = re.search(r"\{([^{}]*,[^{}]*)\}", word)
    if not match:
        return [word]
    return [
        w
        for part in match.group(1).split(",")
        for w in _expand_braces(word[: match.start()] + part + word[match.end() :])
    ]


def commands(body: str, variables: dict[str, str], cwd: Path):
    """Each command of a bash block as (its text, argv of `roformer.cli.main`), expanded as bash would:
    continuation lines joined, comments dropped, variables, braces and globs expanded. A generator: a glob is
    expanded when its command's turn comes, after the commands before it have run."""
    for text in re.sub(r"\\\n", " ", body).splitlines():
        words = shlex.split(text, comments=True)
        if not words:
            continue

        def variable(match, text=text):
            name = match.group(1) or match.group(2)
            if name not in variables:
                raise AssertionError(f"{text}: ${name} is unbound (bind it in the block's marker: name=value)")
            return variables[name]

        words = [re.sub(r"\$\{(\w+)\}|\$(\w+)", variable, w) for w in words]
        words = [b for w in words for b in _expand_braces(w)]
        words = [g for w in words for g in (sorted(glob.glob(w, root_dir=cwd)) or [w] if "*" in w else [w])]
        while words and re.match(r"^\w+=", words[0]):  # VAR=value prefixes (OMP_NUM_THREADS=1)
            words.pop(0)
        yield text.strip(), to_argv(words, text)


def to_argv(words: list[str], text: str) -> list[str]:
    if words[:2] == ["roformer", "launch"]:  # the launcher's own options, its config file checked
        from roformer.launch import check_config_file, split_argv

        _, options, command, rest = split_argv(words[2:])
        if options.config_file:
            check_config_file(options.config_file)
        return [command, *rest]
    if words[0] == "roformer":
        return words[1:]
    if words[0] == "accelerate" and words[1:2] == ["launch"]:
        words = words[next(i for i, w in enumerate(words) if w.endswith(".py")) :]  # the launcher's own options
    elif Path(words[0]).name.startswith("python"):
        words = words[1:]
    script = Path(words[0]).name
    if words[0].startswith("scripts/") and script in SCRIPTS:
        return [SCRIPTS[script], *words[1:]]
    raise AssertionError(f"{text}: not a roformer command; mark its block `<!-- test: skip: why -->`")


# --------------------------------------------------------------------------------------------------
# Running them
# --------------------------------------------------------------------------------------------------


def sandbox(tmp_path: Path) -> Path:
    """A fresh clone's layout: the recipes and scripts of this checkout, ../shared/data beside it, no runs."""
    clone = tmp_path / "clone"
    clone.mkdir()
    for name in ("configs", "scripts"):
        (clone / name).symlink_to(ROOT / name)
    (clone / "docs").mkdir()  # commands may write their plots there
    (tmp_path / "shared").symlink_to(SHARED)
    return clone


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # each command is a fresh process for accelerate
    capsys.readouterr()
    try:
        status = main(argv)
    except SystemExit as exit:  # argparse
        status = exit.code
    out, err = capsys.readouterr()
    return status, out, err


def read_paths(argv: list[str], cfg) -> list[str]:
    """The inputs a command reads: its path arguments and the recipe's local paths."""
    args = build_parser().parse_args(argv)
    paths = [getattr(args, name, None) for name in ("checkpoint", "src", "ref", "hyp", "source")]
    for name in ("runs", "roots", "checkpoints"):
        paths += getattr(args, name, None) or []
    if cfg is not None:
        data = cfg.data
        paths += [getattr(cfg, "init_from", None), getattr(data, "tokenizer", None), getattr(data, "data_dir", None)]
        paths += list(getattr(data, "train_files", []) or []) + list(getattr(data, "validation_files", []) or [])
        for name in ("train_prefix", "valid_prefix", "test_prefix"):
            prefix = getattr(data, name, None)
            paths += [f"{prefix}.{data.source_lang}"] if prefix else []
    return [str(p) for p in paths if p]


def recipes(argv: list[str]) -> list:
    """The configs a command would train with, loaded with its overrides (a bad key or value raises)."""
    from roformer.config import load_config
    from roformer.demo import DEMO_RECIPE

    args = build_parser().parse_args(argv)
    if args.command in RECIPE_COMMANDS:
        return [load_config(args.config or DEMO_RECIPE, args.overrides)]
    if args.command == "glue-sweep":
        return [load_config(Path(args.config_dir) / f"{task}.yaml", args.overrides) for task in args.tasks]
    return [None]


def check(text: str, argv: list[str], cwd: Path, capsys) -> None:
    try:
        configs = recipes(argv)
    except SystemExit:
        pytest.fail(f"{text}: the arguments do not parse: {capsys.readouterr().err.strip()}")
    missing = sorted({p for cfg in configs for p in read_paths(argv, cfg) if not (cwd / p).exists()})
    if missing:  # the command must say so clearly, not crash
        status, _, err = run(argv, capsys)
        lines = err.strip().splitlines()
        assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), f"{text}: exit {status}\n{err}"
        assert any(p in lines[0] for p in missing), f"{text}: {lines[0]} names none of the missing {missing}"


def run_tiny(text: str, argv: list[str], capsys) -> None:
    status, out, err = run([*argv, *TINY.get(argv[0], [])], capsys)
    assert status == 0, f"{text}: exit {status}\n{out[-2000:]}\n{err[-2000:]}"


def parse_variables(arguments: str) -> dict[str, str]:
    return dict(word.split("=", 1) for word in arguments.split())


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


def test_every_shell_block_is_marked():
    unmarked = [
        f"{path.name}:{line}"
        for path in DOCS
        for line, lang, kind, _, _ in blocks(path)
        if lang in {"bash", "sh"} and not kind
    ]
    assert not unmarked, f"mark these blocks `<!-- test: run | check | skip: why -->`: {unmarked}"
    kinds = {kind for path in DOCS for _, _, kind, _, _ in blocks(path)}
    assert {"run", "check", "error"} <= kinds  # the test below has something to do


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_doc_commands(doc, tmp_path, monkeypatch, capsys, single_thread):
    """One intra-op thread, as the docs advise on a shared machine (OMP_NUM_THREADS=1): two threads fighting
    other processes for two cores made these small models several times slower."""
    clone = sandbox(tmp_path)
    monkeypatch.chdir(clone)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never the network: a hub recipe is only checked
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    for line, _, kind, arguments, body in blocks(doc):
        if kind == "error":
            for command, expected in re.findall(r"^\$ (.*)\n((?:(?!\$ ).*\n?)*)", body, flags=re.M):
                status, _, err = run(to_argv(shlex.split(command), command), capsys)
                assert (status, err.strip()) == (2, expected.strip()), f"{doc.name}:{line}: {command}"
        elif kind in {"run", "check"}:
            for text, argv in commands(body, parse_variables(arguments), clone):
                (run_tiny(text, argv, capsys) if kind == "run" else check(text, argv, clone, capsys))
