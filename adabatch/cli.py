"""The ``adabatch`` command line: one subcommand per task, each a small function of parsed arguments.

``adabatch demo`` (also ``python -m adabatch demo``) trains a small model under a growing batch
size; see :mod:`adabatch.demo`. ``adabatch probe`` measures the largest micro-batch the demo's
model trains in the accelerator's memory; see :mod:`adabatch.probe_cli`. ``adabatch plot`` draws
the curves a run wrote to TensorBoard into one image; see :mod:`adabatch.plot`. A new subcommand adds a
parser in :func:`build_parser` and a handler that returns the exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Sequence

from . import __version__
from .demo import (
    DEFAULT_EPOCHS,
    DEFAULT_NUM_SAMPLES,
    DEFAULT_THREADS,
    DemoConfig,
    MissingExtrasError,
    format_summary,
    run_demo,
)
from .memory import DEFAULT_SAFETY_MARGIN, BatchSizeFloorError
from .plot import QUANTITIES, plot_runs, read_runs
from .probe_cli import ProbeConfig, format_report, run_probe

__all__ = ["build_parser", "main"]

#: The image ``adabatch plot`` writes into the (first) run folder unless told otherwise.
DEFAULT_PLOT_NAME = "adabatch.png"

Handler = Callable[[argparse.Namespace], int]


def _failed(command: str, error: Exception, status: int) -> int:
    """Say on stderr what went wrong, as argparse words its own errors, and return ``status``."""
    print(f"adabatch {command}: error: {error}", file=sys.stderr)
    return status


def _configured(command: str, make_config: Callable[[], Any]) -> Any:
    """The command's config, or ``None`` after saying on stderr which value is wrong."""
    try:
        return make_config()
    except ValueError as error:
        _failed(command, error, 2)
        return None


def _demo(args: argparse.Namespace) -> int:
    config = _configured("demo", lambda: DemoConfig(
        epochs=args.epochs,
        num_samples=args.num_samples,
        seed=args.seed,
        logdir=args.logdir,
        num_workers=args.num_workers,
        threads=args.threads,
        progress=not args.no_progress,
    ))
    if config is None:
        return 2
    try:
        result = run_demo(config)
    except MissingExtrasError as error:
        return _failed("demo", error, 1)
    print(json.dumps(result.to_dict()) if args.json else format_summary(result))
    return 0


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train a small CNN on MNIST-1D while the batch grows 32 -> 128 -> 512",
        description=(
            "Generate MNIST-1D locally (Greydanus 2020), train a small 1D CNN with BatchNorm while the batch "
            "grows 32 -> 128 -> 512 at epochs 4 and 8 (learning rate x0.2 at epochs 12 and 16), log to "
            "TensorBoard, and print a summary. Needs the optional packages: pip install \"adabatch[demo]\"."
        ),
    )
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="epochs to train (default: %(default)s)")
    parser.add_argument(
        "--num-samples", type=int, default=DEFAULT_NUM_SAMPLES,
        help="sequences to generate, 80%% for training (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=0,
        help="seed of the model initialisation and the shuffle; the data always uses seed 42 (default: %(default)s)",
    )
    parser.add_argument("--logdir", default=None, help="TensorBoard directory (default: runs/demo-<date>-<time>)")
    parser.add_argument(
        "--num-workers", type=int, default=0, help="DataLoader worker processes (default: %(default)s)"
    )
    parser.add_argument(
        "--threads", type=int, default=DEFAULT_THREADS,
        help="torch threads; use 1 when other programs share the CPU (default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line on stdout")
    parser.add_argument("--no-progress", action="store_true", help="do not show the progress bar on stderr")
    parser.set_defaults(handler=_demo)


def _probe(args: argparse.Namespace) -> int:
    config = _configured("probe", lambda: ProbeConfig(
        fake_capacity=args.fake_capacity,
        fake_fixed=args.fake_fixed,
        fake_per_sample=args.fake_per_sample,
        min_batch_size=args.min_batch_size,
        max_batch_size=args.max_batch_size,
        safety_margin=args.safety_margin,
        seed=args.seed,
        threads=args.threads,
    ))
    if config is None:
        return 2
    try:
        report = run_probe(config)
    except (BatchSizeFloorError, ValueError) as error:
        return _failed("probe", error, 1)
    if report is None:
        message = ("no CUDA device to probe on this machine; describe a simulated one with --fake-capacity "
                   "and --fake-per-sample")
        print(json.dumps({"device": None, "message": message}) if args.json else f"adabatch probe: {message}")
        return 0
    print(json.dumps(report.to_dict()) if args.json else format_report(report))
    return 0


def _add_probe(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "probe",
        help="find the largest micro-batch the demo's CNN trains in the accelerator's memory",
        description=(
            "Run a few real training steps of the demo's MNIST-1D CNN on random inputs, fit peak memory = fixed + "
            "per_sample * batch to them, and verify the predicted cap with one more step. Probes the current "
            "CUDA device, or a simulated device given by --fake-capacity and --fake-per-sample."
        ),
    )
    parser.add_argument("--fake-capacity", type=int, default=None, metavar="BYTES",
                        help="probe a simulated device holding this many bytes instead of CUDA")
    parser.add_argument("--fake-fixed", type=int, default=0, metavar="BYTES",
                        help="bytes a step holds on the simulated device whatever the batch (default: %(default)s)")
    parser.add_argument("--fake-per-sample", type=int, default=None, metavar="BYTES",
                        help="bytes each sample adds on the simulated device")
    parser.add_argument("--min-batch-size", type=int, default=None,
                        help="first size probed (default: the BatchNorm floor, 16)")
    parser.add_argument("--max-batch-size", type=int, default=None,
                        help="largest size probed (default: 1048576 on CUDA, no limit on a simulated device)")
    parser.add_argument("--safety-margin", type=float, default=DEFAULT_SAFETY_MARGIN,
                        help="fraction of the memory above the fixed cost kept free (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model initialisation (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help="torch threads (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON line on stdout")
    parser.set_defaults(handler=_probe)


def _plot(args: argparse.Namespace) -> int:
    output = args.output if args.output is not None else os.path.join(args.run_dirs[0], DEFAULT_PLOT_NAME)
    try:
        runs = read_runs(args.run_dirs)
        drawn = plot_runs(runs, output, dpi=args.dpi)
    except ValueError as error:  # a folder without curves (NoCurvesError), a bad -o or --dpi
        return _failed("plot", error, 2)
    except (MissingExtrasError, OSError) as error:
        return _failed("plot", error, 1)
    print(f"wrote {output} ({len(runs)} run{'s' if len(runs) > 1 else ''}: {', '.join(run.label for run in runs)})")
    not_drawn = [quantity.title for quantity in QUANTITIES if quantity.title not in drawn]
    if not_drawn:
        print(f"not logged by any run, so not drawn: {', '.join(not_drawn)}")
    return 0


def _add_plot(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plot",
        help="draw a run's batch size, learning rate, noise scale and memory cap from its TensorBoard files",
        description=(
            "Read the curves adabatch wrote to TensorBoard in each RUN_DIR (and in every subfolder holding event "
            "files: each is a run, labelled by its folder) and draw the batch size, the effective learning rate, "
            "the gradient noise scale and the memory cap of every run, against samples seen and against "
            "optimizer steps, into one image. Quantities no run logged are left out. Needs matplotlib: "
            "pip install \"adabatch[plot]\"."
        ),
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="a run's TensorBoard folder, or a folder of runs")
    parser.add_argument("-o", "--output", default=None, metavar="FILE",
                        help=f"the image; its suffix gives the format (default: RUN_DIR/{DEFAULT_PLOT_NAME}, "
                             f"the first RUN_DIR's)")
    parser.add_argument("--dpi", type=int, default=100, help="pixels per inch (default: %(default)s)")
    parser.set_defaults(handler=_plot)


def build_parser() -> argparse.ArgumentParser:
    """The ``adabatch`` parser, with one subparser per subcommand."""
    parser = argparse.ArgumentParser(
        prog="adabatch", description="Grow the batch size during PyTorch training."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    _add_demo(subparsers)
    _add_probe(subparsers)
    _add_plot(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``adabatch`` command line and return its exit status.

    With no subcommand, print the help and return 0.

    Args:
        argv (sequence of str, optional): the arguments. Default: ``sys.argv[1:]``.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 0
    return handler(args)
