"""`roformer launch`: `accelerate launch` with a check first.

    roformer launch [accelerate launch options] <roformer command> [its arguments]

accelerate reads its config file only once it is running, so a missing, malformed or wrong file ends in its own
traceback (a missing one even exits 0 through a pipe). Here the file, the roformer command and its arguments
are checked before any process starts: a mistake is one line and exit status 2. Then this runs
`accelerate launch <options> --module roformer.cli <command> <arguments>` and passes its exit status through;
SIGINT, SIGTERM and SIGHUP reach every process of the launch, and this waits until all of them have finished
(a run stopped by SIGTERM saves a checkpoint first; a launch stopped that way ends with the command's status).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from roformer.errors import UserError

USAGE = __doc__.split("\n\n")[1].strip()
GPU_TYPES = {"MULTI_GPU", "FSDP", "DEEPSPEED", "MEGATRON_LM"}
"""distributed_type values whose processes each want a CUDA GPU (unless run on CPU)."""
LEAST = {"num_processes": 1, "num_machines": 1, "machine_rank": 0, "main_process_port": 1}
"""accelerate launch's numeric options and their smallest sensible values."""


def _accelerate_parser():
    from accelerate.commands.launch import launch_command_parser

    parser = launch_command_parser()

    def error(message: str):  # accelerate's usage is a hundred lines: one line instead
        if "training_script" in message:
            message = "name a roformer command after the launcher's options, e.g. `roformer launch pretrain ...`"
        raise UserError(f"roformer launch: {message}")

    parser.error = error
    return parser


def split_argv(argv: list[str]) -> tuple[list[str], object, str, list[str]]:
    """(accelerate's options as given, as parsed, the roformer command, its arguments). accelerate's own parser
    decides which options take a value, so the first word it does not take is the command."""
    args = _accelerate_parser().parse_args(argv)
    command, rest = args.training_script, list(args.training_script_args)
    options = argv[: len(argv) - len(rest) - 1]
    if args.module or args.no_python:
        raise UserError("roformer launch: --module and --no_python are not allowed; it runs roformer's own command")
    return options, args, command, rest


def check_config_file(path: str | Path, flag: str = "--config_file") -> dict:
    """The accelerate config file exists, is a YAML mapping with allowed values, and accelerate loads it."""
    import yaml
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import ComputeEnvironment, DistributedType, PrecisionType, SageMakerDistributedType

    where = f"{flag} {path}"
    path = Path(path)
    if not path.exists():
        raise UserError(f"{where}: no such file")
    if not path.is_file():
        raise UserError(f"{where}: not a file")
    try:
        settings = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"{where}: cannot be read ({err.strerror})") from None
    except UnicodeDecodeError:
        raise UserError(f"{where}: not UTF-8 text") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f"line {mark.line + 1}: " if mark else ""
        raise UserError(f"{where}: not valid YAML ({at}{getattr(err, 'problem', None) or err})") from None
    if not isinstance(settings, dict):
        kind = type(settings).__name__
        raise UserError(f"{where}: expected a mapping of accelerate settings (key: value), not {kind}")
    sagemaker = settings.get("compute_environment") == ComputeEnvironment.AMAZON_SAGEMAKER.value
    choices = {
        "compute_environment": ComputeEnvironment,
        "distributed_type": SageMakerDistributedType if sagemaker else DistributedType,
        "mixed_precision": PrecisionType,
    }
    for key, enum in choices.items():
        allowed = [e.value for e in enum]
        value = settings.get(key)
        if value is not None and value not in allowed:
            hint = " (quote it: YAML reads a bare NO or no as false)" if isinstance(value, bool) else ""
            raise UserError(f"{where}: {key}={value!r} is not allowed; expected one of {', '.join(allowed)}{hint}")
    for key in ("num_processes", "num_machines", "machine_rank"):
        value = settings.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise UserError(f"{where}: {key}={value!r} is not allowed; expected a whole number")
    try:
        load_config_from_file(str(path))  # what `accelerate launch` itself will do: unknown keys, missing ones
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise UserError(f"{where}: {' '.join(str(err).split())}") from None
    return settings


def check_hardware(settings: dict, where: str, on_cpu: bool) -> None:
    """What the config needs and this machine lacks, refused once here rather than once per process (a GPU config
    without a GPU started processes that all acted as main)."""
    import importlib.util

    kind = settings.get("distributed_type")
    if kind == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        raise UserError(f"{where}: distributed_type=DEEPSPEED needs DeepSpeed: pip install deepspeed")
    if kind not in GPU_TYPES or on_cpu or settings.get("use_cpu"):
        return
    import torch

    if not torch.cuda.is_available():
        raise UserError(
            f"{where}: distributed_type={kind} needs CUDA GPUs and none is visible here; "
            "set ACCELERATE_USE_CPU=true to run its processes on CPU"
        )


def preflight(argv: list[str]) -> list[str]:
    """Every check, then the `accelerate launch` command line to run."""
    from accelerate.commands.config.config_args import default_config_file

    from roformer.cli import build_parser, check_numbers, load_training_config

    options, args, command, rest = split_argv(argv)
    for name, least in LEAST.items():
        value = getattr(args, name)
        if value is not None and value < least:
            raise UserError(f"roformer launch: --{name}={value}: must be at least {least}")
    on_cpu = args.cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes", "y", "on", "t")
    # accelerate reads the given file, or else its default one (unless --cpu): the same here
    config_file, flag = args.config_file, "--config_file"
    if config_file is None and not args.cpu and os.path.isfile(default_config_file):
        config_file, flag = default_config_file, "accelerate's default config"
    if config_file is not None:
        check_hardware(check_config_file(config_file, flag), f"{flag} {config_file}", on_cpu)

    parser = build_parser()
    commands = [name for name in parser.commands if name != "launch"]
    if command not in commands:
        raise UserError(f"roformer launch: {command!r} is not a roformer command; expected one of {commands}")
    parsed = parser.parse_args([command, *rest])  # a wrong argument: argparse's message once, not once per process
    check_numbers(parsed)
    if getattr(parsed, "config", None) and command in ("pretrain", "finetune", "translate"):
        load_training_config(parsed)
    return [sys.executable, "-m", "accelerate.commands.launch", *options, "--module", "roformer.cli", command, *rest]


def _become_subreaper() -> None:
    """Processes of the launch that outlive their parent become ours to wait for (Linux; elsewhere a no-op)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def run(command: list[str]) -> int:
    """Run `command` in its own process group; forward stop signals to the whole group (accelerate's one-process
    launcher does not pass them on to its child); return its exit status once every process of it has ended."""
    _become_subreaper()
    group, pending = [], []  # the child's process group once started; signals that came before

    def forward(signum, frame):
        if not group:
            pending.append(signum)
        with contextlib.suppress(ProcessLookupError):
            for pgid in group:
                os.killpg(pgid, signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # before the start, so that none is lost
        signal.signal(sig, forward)
    child = subprocess.Popen(command, start_new_session=True)
    group.append(child.pid)
    for signum in pending:
        forward(signum, None)
    status, orphans = child.wait(), []
    while True:  # the launched processes, if accelerate ended before them (a signal stops it at once)
        try:
            orphans.append(os.waitstatus_to_exitcode(os.waitpid(-1, 0)[1]))
        except ChildProcessError:
            break
    if status < 0 and orphans:  # accelerate was stopped, its command finished: the command's status
        status = next((code for code in orphans if code != 0), 0)
    return status if status >= 0 else 128 - status


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {USAGE}\n\n{__doc__.split(chr(10) * 2, 2)[2]}\naccelerate's options: accelerate launch -h")
        return 0
    return run(preflight(argv))
