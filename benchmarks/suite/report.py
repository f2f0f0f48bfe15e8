"""Records of runs, and the tables and plots made from them.

A record is one JSON-ready dict per (task, policy, seed) (:func:`record`); the tables average
over the seeds and divide by the baseline of the same task, seed by seed (the policies of one
seed ran back to back, so they saw about the same load), then average the ratios.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Iterable, Sequence

from .quality import Evaluation, Metric, first_reaching
from .training import Run

__all__ = ["markdown", "plot", "record", "summarise"]


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def record(run: Run, target: float, metric: Metric) -> dict[str, Any]:
    """The JSON record of ``run``, judged against ``target``: the final quality of the baseline
    of the same task and seed (the run's own, for the baseline)."""
    reached = first_reaching(run.curve, target, metric)
    return {
        "task": run.task,
        "policy": run.policy,
        "seed": run.seed,
        "metric": metric.name,
        "final_quality": run.final.quality,
        "final_train_quality": run.train_quality,
        "wall_s": round(run.final.wall_s, 3),
        "cpu_s": round(run.final.cpu_s, 3),
        "steps": run.final.steps,
        "samples": run.final.samples,
        "baseline_quality": target,
        "time_to_baseline_quality": None if reached is None else round(reached.wall_s, 3),
        "cpu_to_baseline_quality": None if reached is None else round(reached.cpu_s, 3),
        "steps_to_baseline_quality": None if reached is None else reached.steps,
        "samples_to_baseline_quality": None if reached is None else reached.samples,
        "final_batch_size": run.batch_sizes[-1][1],
        "batch_sizes": [list(point) for point in run.batch_sizes],
        "curve": [[e.samples, round(e.wall_s, 3), round(e.cpu_s, 3), e.steps, e.quality] for e in run.curve],
        "signals": [[samples, _finite(noise), factor, _finite(resolution)]
                    for samples, noise, factor, resolution in run.signals],
    }


def _mean(values: Sequence[float]) -> float | None:
    return statistics.mean(values) if values else None


def _standard_error(values: Sequence[float]) -> float | None:
    """The standard error of the mean of ``values``; ``None`` for fewer than two."""
    return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else None


#: Where in a run (fractions of its samples) the tables show the batch size and the signals.
FRACTIONS = (0.0, 1 / 8, 1 / 4, 1 / 2, 3 / 4, 1.0)
FRACTION_NAMES = "0 · 1/8 · 1/4 · 1/2 · 3/4 · end"


def _at(points: Sequence[Sequence[Any]], samples: float) -> list[Any] | None:
    """The values of the last of ``points`` (``[samples, value, ...]``, in order) at or before ``samples``."""
    found = None
    for point in points:
        if point[0] > samples:
            break
        found = list(point[1:])
    return found


def _median_at(runs: Sequence[dict[str, Any]], key: str, column: int) -> list[float | None]:
    """The median over ``runs`` of column ``column`` of ``runs[i][key]`` at each of :data:`FRACTIONS`."""
    medians = []
    for fraction in FRACTIONS:
        values = [(_at(r[key], fraction * r["samples"]) or [None] * (column + 1))[column] for r in runs]
        known = [v for v in values if v is not None]
        medians.append(statistics.median(known) if known else None)
    return medians


#: Standard errors the smoothed |G|² must stand above zero to count as resolved (about 98%
#: one-sided, for a normal error).
RESOLVED_ERRORS = 2.0


def _resolved(runs: Sequence[dict[str, Any]]) -> float | None:
    """The share of the evaluations (of ``runs``, after the second noise measurement) at which
    the smoothed ``|G|²`` stood :data:`RESOLVED_ERRORS` standard errors above zero; ``None``
    where the noise was not measured (or the records predate the column)."""
    values = [point[3] for r in runs for point in r["signals"] if len(point) > 3 and point[3] is not None]
    return sum(value >= RESOLVED_ERRORS for value in values) / len(values) if values else None


def summarise(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per (task, policy), in the order first seen: means over seeds and the mean
    per-seed ratios to the baseline of the same task and seed."""
    baselines = {(r["task"], r["seed"]): r for r in records if r["policy"] == "baseline"}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["task"], r["policy"]), []).append(r)
    summaries = []
    for (task, policy), runs in groups.items():
        paired = [(r, baselines[(task, r["seed"])]) for r in runs if (task, r["seed"]) in baselines]
        qualities = [r["final_quality"] for r in runs]
        differences = [r["final_quality"] - b["final_quality"] for r, b in paired]
        reached = [r for r in runs if r["time_to_baseline_quality"] is not None]
        reached_pairs = [(r, b) for r, b in paired if r["time_to_baseline_quality"] is not None]
        summaries.append({
            "task": task,
            "policy": policy,
            "metric": runs[0]["metric"],
            "seeds": len(runs),
            "final_quality": statistics.mean(qualities),
            "final_quality_std": statistics.stdev(qualities) if len(qualities) > 1 else 0.0,
            "quality_vs_baseline": _mean(differences),
            "quality_vs_baseline_error": _standard_error(differences),
            "wall_s": statistics.mean(r["wall_s"] for r in runs),
            "wall_ratio": _mean([r["wall_s"] / b["wall_s"] for r, b in paired]),
            "cpu_ratio": _mean([r["cpu_s"] / b["cpu_s"] for r, b in paired]),
            "steps": statistics.mean(r["steps"] for r in runs),
            "steps_ratio": _mean([r["steps"] / b["steps"] for r, b in paired]),
            "reached": f"{len(reached)}/{len(runs)}",
            "reached_seeds": len(reached),
            "time_to_baseline_quality": _mean([r["time_to_baseline_quality"] for r in reached]),
            "time_to_baseline_quality_ratio": _mean([r["time_to_baseline_quality"] / b["wall_s"]
                                                     for r, b in reached_pairs]),
            "cpu_to_baseline_quality_ratio": _mean([r["cpu_to_baseline_quality"] / b["cpu_s"]
                                                    for r, b in reached_pairs]),
            "cpu_to_quality_vs_baseline": _mean([r["cpu_to_baseline_quality"] / b["cpu_to_baseline_quality"]
                                                 for r, b in reached_pairs]),
            "steps_to_quality_vs_baseline": _mean([r["steps_to_baseline_quality"] / b["steps_to_baseline_quality"]
                                                   for r, b in reached_pairs]),
            "steps_to_baseline_quality": _mean([r["steps_to_baseline_quality"] for r in reached]),
            "final_batch_size": statistics.median(r["final_batch_size"] for r in runs),
            "batch_size_at": _median_at(runs, "batch_sizes", 0),
            "noise_scale_at": _median_at(runs, "signals", 0),
            "lr_factor_at": _median_at(runs, "signals", 1),
            "resolved": _resolved(runs),
            "train_quality": _mean([r["final_train_quality"] for r in runs
                                    if r.get("final_train_quality") is not None]),
        })
    return summaries


def _number(value: float | None, form: str) -> str:
    return "–" if value is None else format(value, form)


def _difference(mean: float | None, error: float | None, form: str) -> str:
    return _number(mean, "+" + form) + ("" if mean is None or error is None else f" ± {error:{form}}")


def _series(values: Sequence[float | None], form: str) -> str:
    return " · ".join(_number(value, form) for value in values)


def markdown(summaries: Iterable[dict[str, Any]]) -> str:
    """Two markdown tables per task: quality, time, steps, and the CPU time and steps to the
    baseline's final quality (as ratios to the baseline's whole run, and to its own time and
    steps to it); then the batch size, the noise scale and the learning-rate factor along the
    run (medians over seeds), the share of evaluations at which the measured ``|G|²`` was
    resolved, and the final quality on the training set (mean over seeds); then the policy that
    reached that quality first at every seed."""
    sections: dict[str, list[str]] = {}
    trajectories: dict[str, list[str]] = {}
    by_task: dict[str, list[dict[str, Any]]] = {}
    for s in summaries:
        lines = sections.setdefault(s["task"], [
            f"| policy | final {s['metric']} (mean ± std) | Δ vs baseline (± s.e., paired by seed) | wall s "
            f"| wall × baseline | CPU × baseline | steps | × baseline | reached baseline's quality "
            f"| CPU to it × baseline's run | CPU to it × baseline's own | steps to it × baseline's own | final batch |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ])
        by_task.setdefault(s["task"], []).append(s)
        digits = ".2f" if s["metric"].startswith("accuracy") else ".4f"
        lines.append(
            f"| {s['policy']} | {s['final_quality']:{digits}} ± {s['final_quality_std']:{digits}} | "
            f"{_difference(s['quality_vs_baseline'], s['quality_vs_baseline_error'], digits)} | "
            f"{s['wall_s']:.1f} | {_number(s['wall_ratio'], '.2f')} | {_number(s['cpu_ratio'], '.2f')} | "
            f"{s['steps']:,.0f} | {_number(s['steps_ratio'], '.2f')} | {s['reached']} seeds | "
            f"{_number(s['cpu_to_baseline_quality_ratio'], '.2f')} | "
            f"{_number(s['cpu_to_quality_vs_baseline'], '.2f')} | {_number(s['steps_to_quality_vs_baseline'], '.2f')} | "
            f"{s['final_batch_size']:g} |")
        trajectories.setdefault(s["task"], [
            f"| policy | batch size at {FRACTION_NAMES} of the samples | noise scale B_simple at the same | "
            f"LR factor (adabatch's) at the same | evaluations with \\|G\\|² resolved | "
            f"final {s['metric']} on the training set (mean) |",
            "|---|---|---|---|---|---|",
        ]).append(f"| {s['policy']} | {_series(s['batch_size_at'], 'g')} | {_series(s['noise_scale_at'], '.3g')} | "
                  f"{_series(s['lr_factor_at'], '.2f')} | {_number(s['resolved'], '.0%')} | "
                  f"{_number(s['train_quality'], digits)} |")
    return "\n\n".join(
        "\n\n".join(part for part in (f"### {task}", "\n".join(lines), "\n".join(trajectories[task]),
                                       _fastest(by_task[task])) if part)
        for task, lines in sections.items())


def _fastest(summaries: Sequence[dict[str, Any]]) -> str:
    """A line naming the policy that reached the baseline's quality at every seed in the least
    CPU time (as a fraction of the baseline's own), and each ``adaptive`` policy's time beside it."""
    reliable = [s for s in summaries if s["cpu_to_quality_vs_baseline"] is not None
                and s["reached_seeds"] == s["seeds"]]
    if not reliable:  # no baseline among the records
        return ""
    best = min(reliable, key=lambda s: s["cpu_to_quality_vs_baseline"])
    line = (f"Fastest to the baseline's quality at every seed: `{best['policy']}`, "
            f"{best['cpu_to_quality_vs_baseline']:.2f} of the baseline's CPU time to it "
            f"({best['seeds']} seed{'' if best['seeds'] == 1 else 's'}).")
    for s in summaries:
        if s["policy"].startswith("adaptive") and s["policy"] != best["policy"]:
            ratio = s["cpu_to_quality_vs_baseline"]
            line += (f" `{s['policy']}`: " + ("never reached it" if ratio is None else
                     f"{ratio:.2f} ({s['reached']} seeds), ×{ratio / best['cpu_to_quality_vs_baseline']:.2f} the fastest")
                     + ".")
    return line


def plot(records: Sequence[dict[str, Any]], task: str, path: Path) -> None:
    """Quality against training CPU time (steadier than the wall time on a shared machine) and
    the batch size against samples, for every policy and seed of ``task``."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in records if r["task"] == task]
    # Ten colours, then the same ten dashed.
    styles = {policy: {"color": f"C{i % 10}", "linestyle": "-" if i < 10 else "--"}
              for i, policy in enumerate(dict.fromkeys(r["policy"] for r in runs))}
    figure, (quality_axis, batch_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    labelled: set[str] = set()
    for r in runs:
        label = None if r["policy"] in labelled else r["policy"]
        labelled.add(r["policy"])
        curve = [Evaluation(*point) for point in r["curve"]]
        quality_axis.plot([e.cpu_s for e in curve], [e.quality for e in curve], **styles[r["policy"]], label=label,
                          alpha=0.7)
        points = r["batch_sizes"] + [[r["samples"], r["batch_sizes"][-1][1]]]
        batch_axis.step([p[0] for p in points], [p[1] for p in points], where="post", **styles[r["policy"]],
                        label=label, alpha=0.7)
    final = [r["final_quality"] for r in runs if r["policy"] == "baseline"]
    if final:  # around the baseline's final quality, where the policies part, and every run's end
        target = statistics.mean(final)
        ends = [r["final_quality"] for r in runs]
        quality_axis.axhline(target, color="grey", linestyle=":", linewidth=1)
        if runs[0]["metric"].startswith("accuracy"):
            quality_axis.set_ylim(min(target - 3, min(ends) - 0.5), min(100, max(ends) + 1))
        else:
            quality_axis.set_ylim(min(target, min(ends)) * 0.95, max(target * 1.3, max(ends) * 1.1))
    quality_axis.set(xlabel="training CPU time (s), one thread", ylabel=runs[0]["metric"],
                     title=f"{task}: held-out quality")
    batch_axis.set(xlabel="samples seen", ylabel="batch size", title=f"{task}: batch size")
    batch_axis.set_yscale("log", base=2)
    batch_axis.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    batch_axis.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for axis in (quality_axis, batch_axis):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
