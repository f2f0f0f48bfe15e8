"""Run the suite: every chosen task under every policy, seed by seed, and report.

Usage::

    python3 -m benchmarks.suite [--task gpt ...] [--seeds 0 1 2] [--sweep] [--quick]
                                [--adaptive-options extra_samples=0.05 ...]
                                [--threads 1] [--json] [--out benchmarks/results/suite.md]
    python3 -m benchmarks.suite ... --out benchmarks/results/suite.md --resume   # only the runs missing
    python3 -m benchmarks.suite --report benchmarks/results/suite.jsonl [--out ...]

Within a task the policies run back to back for each seed in turn (seed-major), so a change of
the machine's load falls on all of them alike; torch runs one thread by default (with another
process on a 2-core machine, two threads waiting for each other slow a run 3–4×).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from adabatch import schedules

from . import TASKS
from .policies import DEFAULT_POLICIES, Policy, base_name, policies
from .report import markdown, plot, record, summarise
from .task import Task
from .training import train

__all__ = ["choose_policies", "main", "run_task"]


def choose_policies(task: Task, sweep: bool, policy_names: Sequence[str] | None,
                    adaptive_options: Mapping[str, Any] | None = None) -> list[Policy]:
    """The policies of ``task`` named in ``policy_names`` (by their names without options) and
    the baseline, or all if ``None``.

    Raises:
        ValueError: if a name is not one of the task's policies.
    """
    available = policies(task, sweep, adaptive_options)
    names = [base_name(p.name) for p in available]
    unknown = sorted(set(policy_names or ()) - set(names))
    if unknown:
        raise ValueError(f"policy_names has {unknown}, which {task.name} does not run"
                         f"{'' if sweep else ' without sweep'}; choose from {names}")
    return [p for p, name in zip(available, names)
            if policy_names is None or name in policy_names or name == "baseline"]


def run_task(task: Task, seeds: Sequence[int], *, sweep: bool = False, quick: bool = False, num_workers: int = 0,
             max_steps: int | None = None, policy_names: Sequence[str] | None = None,
             adaptive_options: Mapping[str, Any] | None = None, done: Sequence[dict[str, Any]] = (),
             on_record: Callable[[dict[str, Any]], None] = lambda r: None) -> list[dict[str, Any]]:
    """Train ``task`` under its policies for each seed, the baseline first, and return the new records.

    Args:
        task (Task): what to train.
        seeds (sequence of int): the seeds, outermost.
        sweep (bool): add the sweep's policies. Default: ``False``.
        quick (bool): the task's tiny data and epochs. Default: ``False``.
        num_workers (int): DataLoader worker processes. Default: 0.
        max_steps (int, optional): stop every run after this many optimizer steps. Default: none.
        policy_names (sequence of str, optional): run only these (and the baseline). Default: all.
        adaptive_options (mapping, optional): keyword arguments of the ``Adaptive`` policies.
            Default: none (every default).
        done (sequence of dict): records of earlier runs (of any task): the (policy, seed) of
            ``task`` they hold are not run again, and a baseline's gives its seed's target.
        on_record (callable): called with each new record as soon as it exists.
    """
    chosen = choose_policies(task, sweep, policy_names, adaptive_options)
    finished = {(r["policy"], r["seed"]): r for r in done if r["task"] == task.name}
    if all((policy.name, seed) in finished for seed in seeds for policy in chosen):
        return []
    train_set, test_set = task.data(quick)
    records = []
    for seed in seeds:
        target: float | None = None
        for policy in chosen:
            earlier = finished.get((policy.name, seed))
            if earlier is None:
                run = train(task, policy, seed, train_set, test_set, epochs=task.epochs_for(quick),
                            num_workers=num_workers, max_steps=max_steps)
                target = run.final.quality if target is None else target
                records.append(record(run, target, task.metric))
                on_record(records[-1])
            elif target is None:
                target = earlier["final_quality"]
    return records


def _progress_line(r: dict[str, Any]) -> str:
    reached = r["time_to_baseline_quality"]
    return (f"  {r['task']:16s} {r['policy']:14s} seed {r['seed']}: {r['metric']} {r['final_quality']:.4f} in "
            f"{r['wall_s']:.1f} s, {r['steps']:,} steps, final batch {r['final_batch_size']}, baseline's quality "
            f"{'never' if reached is None else f'at {reached:.1f} s'}")


def write(records: list[dict[str, Any]], out: Path, header: str) -> None:
    """Write the markdown report to ``out`` and one plot per task (if matplotlib is installed) next to it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    sections = [header, markdown(summarise(records))]
    if importlib.util.find_spec("matplotlib") is not None:
        for task in dict.fromkeys(r["task"] for r in records):
            image = out.with_name(f"{out.stem}-{task}.png")
            plot(records, task, image)
            sections.append(f"![{task}]({image.name})")
    out.write_text("\n\n".join(sections) + "\n")


def write_records(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Write ``records`` to ``path`` as JSON lines, one per record, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def read_records(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """The records in the JSON-lines files ``paths``, in order.

    Raises:
        SystemExit: naming the file and line that is not a record.
    """
    records = []
    for path in paths:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise SystemExit(f"--report: {path} line {number} is not a JSON record (the .jsonl that --out "
                                 f"writes is)") from None
    return records


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.suite",
                                     description="Batch-size policies side by side on a suite of small tasks.")
    parser.add_argument("--task", nargs="+", choices=list(TASKS), default=list(TASKS), help="default: all")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--policies", nargs="+", default=None,
                        help=f"run only these and the baseline (default: {', '.join(DEFAULT_POLICIES)}, and the "
                             f"sweep's with --sweep)")
    parser.add_argument("--sweep", action="store_true", help="add fixed 16-512 (sqrt LR) and three more timetables")
    parser.add_argument("--adaptive-options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="keyword arguments of the Adaptive policies, which are named after them "
                             "(as adaptive[extra_samples=0.05])")
    parser.add_argument("--ghost-batch-norm", action="store_true",
                        help="BatchNorm over ghost batches of the baseline's size, for every policy (the tasks "
                             "are named <task>+ghost-bn)")
    parser.add_argument("--quick", action="store_true", help="tiny data, one epoch: a smoke test")
    parser.add_argument("--max-steps", type=int, default=None, help="stop every run after this many steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default: 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON line per (task, policy, seed)")
    parser.add_argument("--out", type=Path, default=None,
                        help="write a markdown report here, the JSON lines next to it (.jsonl) and plots")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs already in --out's .jsonl and run only the missing ones")
    parser.add_argument("--report", type=Path, nargs="+", default=None,
                        help="train nothing: report on the JSON lines of earlier runs")
    args = parser.parse_args(argv)
    if args.resume and args.out is None:
        parser.error("--resume needs --out: it reads the runs back from the .jsonl next to it")
    try:
        args.adaptive_options = _adaptive_options(args.adaptive_options)
    except (TypeError, ValueError) as error:
        parser.error(f"--adaptive-options: {error}")
    for name in ("threads", "workers", "max_steps"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "workers" else 1):
            parser.error(f"--{name.replace('_', '-')} must be at least {0 if name == 'workers' else 1}, got {value}")
    return args


def _adaptive_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs as keyword arguments (each value a Python literal, or else a string),
    checked by building an ``Adaptive`` with them."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, equals, text = pair.partition("=")
        if not equals or not key.isidentifier():
            raise ValueError(f"{pair!r} is not KEY=VALUE")
        if key == "start":
            raise ValueError("start is each policy's own (the baseline's batch; adaptive-16's default)")
        try:
            options[key] = ast.literal_eval(text)
        except (SyntaxError, ValueError):
            options[key] = text
    schedules.Adaptive(**options)  # raises on an unknown key or a bad value, naming it
    return options


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.report:
        records = read_records(args.report)
        header = (f"{len(records)} runs read from {', '.join(p.name for p in args.report)}: "
                  f"{sum(r['wall_s'] for r in records) / 60:.0f} min of training wall time, "
                  f"{sum(r['cpu_s'] for r in records) / 60:.0f} min of CPU time.")
        if args.out is not None and args.out.with_suffix(".jsonl") not in args.report:
            write_records(args.out.with_suffix(".jsonl"), records)
    else:
        torch.set_num_threads(args.threads)
        begin = time.perf_counter()

        for name in args.task:  # before any training
            try:
                choose_policies(TASKS[name], args.sweep, args.policies, args.adaptive_options)
            except ValueError as error:
                raise SystemExit(f"--policies: {error}") from None
        lines = None if args.out is None else args.out.with_suffix(".jsonl")
        records = read_records([lines]) if args.resume and lines.exists() else []
        resumed = len(records)
        if lines is not None:
            write_records(lines, records)

        def emit(r: dict[str, Any]) -> None:
            print(json.dumps(r) if args.json else _progress_line(r), flush=True)
            if lines is not None:  # as each run ends: a run that is stopped keeps what it measured
                with lines.open("a") as file:
                    file.write(json.dumps(r) + "\n")

        for name in args.task:
            task = TASKS[name].with_ghost_batch_norm() if args.ghost_batch_norm else TASKS[name]
            records += run_task(task, args.seeds, sweep=args.sweep, quick=args.quick, num_workers=args.workers,
                                max_steps=args.max_steps, policy_names=args.policies,
                                adaptive_options=args.adaptive_options, done=records, on_record=emit)
        header = (f"`python3 -m benchmarks.suite {' '.join(sys.argv[1:] if argv is None else argv)}`: "
                  f"{len(records) - resumed} runs{f' (and {resumed} read back)' if resumed else ''}, torch threads "
                  f"{args.threads}, {time.perf_counter() - begin:.0f} s in all.")
    if not args.json:
        print(markdown(summarise(records)))
    if args.out is not None:
        write(records, args.out, header)
