"""The benchmark suite (``benchmarks/suite``): its judging of quality, its records, and a few
steps of every task through the real loop (its numbers come from running it in full, not here)."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from adabatch import BatchSizeScheduler, schedules
from adabatch.schedules.adaptive import DEFAULT_START
from benchmarks.suite import TASKS
from benchmarks.suite.ghost_batch_norm import GhostBatchNorm
from benchmarks.suite.policies import policies
from benchmarks.suite.quality import ACCURACY, Evaluation, Metric, first_reaching
from benchmarks.suite.report import markdown, record, summarise
from benchmarks.suite.runner import main, run_task
from benchmarks.suite.step_cost import main as step_cost_main
from benchmarks.suite.step_cost import variant_step
from benchmarks.suite.training import Run, noise_signals

ROOT = Path(__file__).resolve().parents[1]
LOSS = Metric("bits/char", higher_is_better=False, tolerance=0.01)
FIELDS = {"task": str, "policy": str, "seed": int, "metric": str, "final_quality": float,
          "final_train_quality": float, "wall_s": float, "cpu_s": float,
          "steps": int, "samples": int, "baseline_quality": float, "final_batch_size": int,
          "batch_sizes": list, "curve": list, "signals": list}
OPTIONAL_FIELDS = {"time_to_baseline_quality": float, "cpu_to_baseline_quality": float, "steps_to_baseline_quality": int,
                   "samples_to_baseline_quality": int}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def curve(*qualities: float) -> list[Evaluation]:
    """One evaluation per second of wall time, half a second of CPU time and 10 steps."""
    return [Evaluation(100 * (i + 1), float(i + 1), (i + 1) / 2, 10 * (i + 1), q) for i, q in enumerate(qualities)]


@pytest.mark.parametrize("qualities, target, expected", [
    ((90.0, 98.85, 98.91, 99.3), 99.0, 3.0),  # 98.91 is within 0.1 points of 99.0; 98.85 is not
    ((90.0, 99.5, 98.0), 99.0, 2.0),  # the first time counts, whatever follows
    ((90.0, 98.0, 98.89), 99.0, None),
    ((97.0, 98.0), 98.0, 2.0),  # the baseline reaches its own final quality at its end at the latest
])
def test_accuracy_is_reached_within_a_tenth_of_a_point(qualities, target, expected):
    reached = first_reaching(curve(*qualities), target, ACCURACY)
    assert (None if reached is None else reached.wall_s) == expected


@pytest.mark.parametrize("qualities, target, expected", [
    ((3.0, 2.03, 2.019, 1.9), 2.0, 3.0),  # a loss within 1% of the target: at most 2.02
    ((3.0, 2.1), 2.0, None),
    ((-1.0, -2.0), -2.0, 2.0),  # a negative loss's 1% is above it
])
def test_a_loss_is_reached_within_one_percent(qualities, target, expected):
    reached = first_reaching(curve(*qualities), target, LOSS)
    assert (None if reached is None else reached.wall_s) == expected


def test_a_negative_tolerance_is_refused():
    with pytest.raises(ValueError, match="tolerance"):
        Metric("accuracy %", higher_is_better=True, tolerance=-0.1)


def test_records_time_the_baseline_quality_and_the_ratios_pair_seeds():
    baseline = Run("t", "baseline", 0, curve(97.0, 98.95, 98.8, 99.0), [(0, 32)], [(400, math.nan, 1.0, math.nan)])
    faster = Run("t", "adaptive", 0, curve(98.0, 98.92, 99.2), [(0, 32), (150, 64)], [(300, 40.0, 1.3, 2.5)])
    ours, theirs = record(baseline, 99.0, ACCURACY), record(faster, 99.0, ACCURACY)
    assert (ours["time_to_baseline_quality"], ours["cpu_to_baseline_quality"], ours["steps_to_baseline_quality"]) \
        == (2.0, 1.0, 20)
    assert (theirs["time_to_baseline_quality"], theirs["steps_to_baseline_quality"]) == (2.0, 20)
    assert theirs["final_batch_size"] == 64 and ours["signals"] == [[400, None, 1.0, None]]
    assert theirs["signals"] == [[300, 40.0, 1.3, 2.5]]
    summary = {s["policy"]: s for s in summarise([ours, theirs])}
    assert summary["adaptive"]["wall_ratio"] == summary["adaptive"]["cpu_ratio"] == pytest.approx(3 / 4)
    assert summary["adaptive"]["quality_vs_baseline"] == pytest.approx(0.2)
    assert summary["adaptive"]["time_to_baseline_quality_ratio"] == pytest.approx(2 / 4)
    # at 0, 1/8, 1/4, 1/2, 3/4 and the end of its 300 samples
    assert summary["adaptive"]["batch_size_at"] == [32, 32, 32, 64, 64, 64]
    assert summary["adaptive"]["noise_scale_at"] == [None] * 5 + [40.0]
    assert summary["baseline"]["noise_scale_at"] == [None] * 6
    assert summary["adaptive"]["lr_factor_at"] == [None] * 5 + [1.3]
    # reached at 1 s of CPU time, as the baseline did: half of the baseline's run, all of its own time
    assert "| adaptive | 99.20 ± 0.00 | +0.20 | 3.0 | 0.75 | 0.75 | 30 | 0.75 | 1/1 seeds | 0.50 | 1.00 | 1.00 | 64 |" \
        in markdown(summary.values())


def test_the_report_names_the_fastest_policy_that_reached_the_baseline_s_quality_at_every_seed():
    runs = []
    for seed in (0, 1):
        runs.append(record(Run("t", "baseline", seed, curve(97.0, 98.0, 98.5, 99.0), [(0, 32)], []), 99.0, ACCURACY))
        # at the second evaluation at one seed, never at the other: not reliable, however fast
        lucky = curve(97.0, 99.0, 98.0, 98.0) if seed == 0 else curve(97.0, 98.0, 98.0, 98.0)
        runs.append(record(Run("t", "fixed-64", seed, lucky, [(0, 64)], []), 99.0, ACCURACY))
        runs.append(record(Run("t", "fixed-128", seed, curve(97.0, 98.0, 99.0), [(0, 128)], []), 99.0, ACCURACY))
        runs.append(record(Run("t", "adaptive", seed, curve(97.0, 98.0, 98.0, 99.0), [(0, 32)], []), 99.0,
                           ACCURACY))
    summaries = summarise(runs)
    by_policy = {s["policy"]: s for s in summaries}
    assert by_policy["fixed-128"]["cpu_to_quality_vs_baseline"] == pytest.approx(3 / 4)
    assert by_policy["fixed-128"]["steps_to_quality_vs_baseline"] == pytest.approx(3 / 4)
    assert by_policy["fixed-64"]["reached_seeds"] == 1
    assert markdown(summaries).endswith(
        "Fastest to the baseline's quality at every seed: `fixed-128`, 0.75 of the baseline's CPU time to it "
        "(2 seeds). `adaptive`: 1.00 (2/2 seeds), ×1.33 the fastest.")
    # without a baseline, nothing is compared
    assert "Fastest" not in markdown(summarise([r for r in runs if r["policy"] != "baseline"]))


def test_the_report_gives_the_mean_final_quality_on_the_training_set():
    runs = []
    for seed, train_quality in enumerate([99.5, 99.9]):
        run = Run("t", "baseline", seed, curve(90.0, 91.0), [(0, 32)], [], train_quality=train_quality)
        runs.append(record(run, 91.0, ACCURACY))
    assert [r["final_train_quality"] for r in runs] == [99.5, 99.9]
    [summary] = summarise(runs)
    assert summary["train_quality"] == pytest.approx(99.7)
    assert markdown([summary]).split("\n\n")[2].endswith("| – | 99.70 |")  # unmeasured noise, then the column
    older = [{key: value for key, value in r.items() if key != "final_train_quality"} for r in runs]
    [summary] = summarise(older)  # records written before the column
    assert summary["train_quality"] is None and markdown([summary]).split("\n\n")[2].endswith("| – | – |")


def test_the_difference_to_the_baseline_has_a_standard_error_paired_by_seed():
    """Seeds differ more from each other than a policy from the baseline at the same seed: the
    error is that of the per-seed differences, not of either policy's qualities."""
    runs = []
    for seed, (base, ours) in enumerate([(97.0, 97.1), (99.0, 99.3), (98.0, 98.2)]):
        runs.append(record(Run("t", "baseline", seed, curve(90.0, base), [(0, 32)], []), base, ACCURACY))
        runs.append(record(Run("t", "adaptive", seed, curve(90.0, ours), [(0, 32)], []), base, ACCURACY))
    summary = {s["policy"]: s for s in summarise(runs)}
    differences = [0.1, 0.3, 0.2]
    assert summary["adaptive"]["quality_vs_baseline"] == pytest.approx(0.2)
    assert summary["adaptive"]["quality_vs_baseline_error"] == pytest.approx(statistics.stdev(differences) / 3**0.5)
    assert summary["baseline"]["quality_vs_baseline_error"] == 0.0
    assert "| adaptive | 98.20 ± 1.10 | +0.20 ± 0.06 |" in markdown(summary.values())
    one_seed = summarise([r for r in runs if r["seed"] == 0])
    assert [s["quality_vs_baseline_error"] for s in one_seed] == [None, None]


def check_record(r: dict, task: str) -> None:
    assert r["task"] == task
    for name, kind in FIELDS.items():
        assert isinstance(r[name], kind), (name, r[name])
    for name, kind in OPTIONAL_FIELDS.items():
        assert r[name] is None or isinstance(r[name], kind), (name, r[name])
    assert r["steps"] > 0 and r["wall_s"] > 0 and r["cpu_s"] > 0 and math.isfinite(r["final_quality"])
    assert math.isfinite(r["final_train_quality"])
    assert r["curve"][-1][4] == r["final_quality"] and r["curve"][-1][3] == r["steps"]
    assert r["batch_sizes"][0][0] == 0 and r["final_batch_size"] == r["batch_sizes"][-1][1]
    assert all(len(point) == 4 for point in r["signals"])  # samples, noise scale, LR factor, resolution
    assert json.loads(json.dumps(r, allow_nan=False)) == r


def test_a_run_records_the_smoothed_gradient_in_units_of_its_error():
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert all(math.isnan(value) for value in noise_signals(BatchSizeScheduler(optimizer, schedules.Constant(8))))
    scheduler = BatchSizeScheduler(optimizer, schedules.Constant(8), measure_noise=True)
    noise = scheduler.noise_meter.noise
    noise.update(3.0, 8, 1.5, 16)
    assert noise_signals(scheduler)[0] == noise.noise_scale and math.isnan(noise_signals(scheduler)[1])
    for small, big in [(2.5, 1.0), (4.0, 2.5), (3.0, 1.2)]:
        noise.update(small, 8, big, 16)
    assert noise_signals(scheduler) == (noise.noise_scale, noise.grad_sqr / noise.standard_errors[0])


def test_the_report_gives_the_share_of_evaluations_with_the_gradient_resolved():
    def adaptive(seed: int, signals: list[list]) -> dict:
        return {"task": "t", "policy": "adaptive", "seed": seed, "metric": ACCURACY.name, "final_quality": 99.0,
                "wall_s": 1.0, "cpu_s": 1.0, "steps": 10, "samples": 100, "time_to_baseline_quality": None,
                "cpu_to_baseline_quality": None, "steps_to_baseline_quality": None, "final_batch_size": 32,
                "batch_sizes": [[0, 32]], "signals": signals}

    # |G|² in units of its error: 2.5 and 2.0 resolved, 1.9 and -3 not, None (unmeasured) not counted.
    runs = [adaptive(0, [[25, None, 1.0, None], [50, 900.0, 1.1, 2.5], [100, 800.0, 1.2, 1.9]]),
            adaptive(1, [[50, 700.0, 1.0, -3.0], [100, 1e4, 1.0, 2.0]])]
    [summary] = summarise(runs)
    assert summary["resolved"] == 0.5
    assert "| 50% |" in markdown([summary])
    older = [adaptive(0, [[50, 900.0, 1.1]])]  # records written before the column
    [summary] = summarise(older)
    assert summary["resolved"] is None and markdown([summary]).endswith("| – |")


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_trains_a_few_steps_of_every_policy(task):
    records = run_task(TASKS[task], [0], quick=True, max_steps=6, num_workers=2 if task == "mlp-sgd" else 0)
    assert [r["policy"] for r in records] == ["baseline", "adaptive", "timetable"]
    for r in records:
        check_record(r, task)
        assert r["steps"] == 6
    assert records[0]["time_to_baseline_quality"] is not None  # the baseline reaches its own final quality
    assert records[0]["final_batch_size"] == TASKS[task].baseline_batch_size
    # Adaptive() starts where the user would train: the baseline's batch.
    assert records[1]["final_batch_size"] == TASKS[task].baseline_batch_size


def test_evaluations_fall_every_quarter_epoch_and_are_not_timed():
    def slow_evaluate(model, test_set):
        time.sleep(0.2)
        return TASKS["mlp-sgd"].evaluate(model, test_set)

    task = dataclasses.replace(TASKS["mlp-sgd"], evaluate=slow_evaluate)
    baseline = run_task(task, [0], quick=True, policy_names=[])[0]
    interval = len(task.data(True)[0]) / 4
    samples = [point[0] for point in baseline["curve"]]
    assert len(samples) == 4
    for quarter, seen in enumerate(samples, start=1):
        assert quarter * interval <= seen < quarter * interval + 32
    assert baseline["wall_s"] < 0.2 * len(samples) / 2


def test_the_sweep_scales_the_learning_rate_by_the_square_root_of_the_batch_and_linearly():
    names = [p.name for p in policies(TASKS["cnn-sgd"], sweep=True)]
    assert names == ["baseline", "adaptive", "timetable", "adaptive-16", "fixed-16", "fixed-64", "fixed-128",
                     "fixed-256", "fixed-512", "fixed-64-linear", "fixed-128-linear", "fixed-256-linear",
                     "step-x2-late", "geometric", "doubling-sqrt"]
    records = run_task(TASKS["cnn-sgd"], [1], sweep=True, quick=True, max_steps=2,
                       policy_names=["fixed-128", "fixed-128-linear"])
    factors = {r["policy"]: r["signals"][-1][2] for r in records}
    assert factors == {"baseline": 1.0, "fixed-128": pytest.approx(2.0), "fixed-128-linear": pytest.approx(4.0)}
    assert [r["final_batch_size"] for r in records] == [32, 128, 128]
    [_, default_start] = run_task(TASKS["cnn-sgd"], [1], sweep=True, quick=True, max_steps=2,
                                  policy_names=["adaptive-16"])
    assert default_start["final_batch_size"] == DEFAULT_START


def test_ghost_batch_norm_leaves_the_baseline_and_keeps_a_grown_batch_s_statistics():
    """``--ghost-batch-norm``: the baseline's batch of 32 trains exactly as with plain BatchNorm;
    fixed-128 normalises ghost batches of 32, so it trains otherwise."""
    ghost = TASKS["cnn-sgd"].with_ghost_batch_norm()
    assert ghost.name == "cnn-sgd+ghost-bn"
    assert sum(isinstance(m, GhostBatchNorm) and m.virtual_batch_size == 32 for m in ghost.model().modules()) == 3
    plain = run_task(TASKS["cnn-sgd"], [0], sweep=True, quick=True, max_steps=6, policy_names=["fixed-128"])
    grown = run_task(ghost, [0], sweep=True, quick=True, max_steps=6, policy_names=["fixed-128"])
    assert [r["task"] for r in grown] == ["cnn-sgd+ghost-bn"] * 2
    def qualities(record):  # (samples, steps, quality) at each evaluation, without the times
        return [(point[0], point[3], point[4]) for point in record["curve"]]

    assert qualities(grown[0]) == qualities(plain[0])
    assert qualities(grown[1]) != qualities(plain[1])


def run_suite(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "benchmarks.suite", *args], capture_output=True, text=True,
                          timeout=120, check=False, cwd=ROOT)


def test_the_command_line_prints_json_lines_and_writes_the_report(tmp_path):
    out = tmp_path / "suite.md"
    completed = run_suite("--task", "regression-adam", "--quick", "--max-steps", "3", "--seeds", "0", "1", "--json",
                          "--out", str(out))
    assert completed.returncode == 0, completed.stderr
    records = [json.loads(line) for line in completed.stdout.splitlines()]
    assert [(r["policy"], r["seed"]) for r in records] == [(p, s) for s in (0, 1)
                                                            for p in ("baseline", "adaptive", "timetable")]
    for r in records:
        check_record(r, "regression-adam")
    assert [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()] == records
    report = out.read_text()
    assert "### regression-adam" in report and "| timetable |" in report
    assert (tmp_path / "suite-regression-adam.png").stat().st_size > 0
    again = run_suite("--report", str(out.with_suffix(".jsonl")))
    assert again.returncode == 0, again.stderr
    assert markdown(summarise(records)) in again.stdout


def test_a_report_from_a_file_that_is_not_json_lines_names_it(tmp_path):
    table = tmp_path / "suite.md"
    table.write_text("| policy |\n")
    with pytest.raises(SystemExit, match=f"--report: {table} line 1 is not a JSON record"):
        main(["--report", str(table)])


@pytest.mark.parametrize("args, message", [
    (["--threads", "0"], "--threads must be at least 1, got 0"),
    (["--task", "gpt", "--policies", "fixed-64"], "--policies: policy_names has ['fixed-64'], which gpt does not run "
                                                  "without sweep; choose from ['baseline', 'adaptive', 'timetable']"),
    (["--task", "imagenet"], "invalid choice: 'imagenet'"),
])
def test_bad_arguments_are_named(args, message, capsys):
    with pytest.raises(SystemExit) as exit:
        main(args)
    assert message in str(exit.value.code) + capsys.readouterr().err


def test_a_stopped_suite_resumes_with_the_runs_it_lacks(tmp_path, capsys):
    out = tmp_path / "suite.md"
    arguments = ["--task", "regression-adam", "--quick", "--max-steps", "3", "--seeds", "0", "--json", "--out", str(out)]
    main(arguments)
    first = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    lines = out.with_suffix(".jsonl")
    assert [json.loads(line) for line in lines.read_text().splitlines()] == first
    lines.write_text("".join(json.dumps(r) + "\n" for r in first[:2]))  # as if stopped during the third run
    main([*arguments, "--resume"])
    again = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["policy"] for r in again] == ["timetable"]
    assert again[0]["baseline_quality"] == first[0]["final_quality"]
    assert again[0]["final_quality"] == first[2]["final_quality"]  # the same run: seeded, deterministic
    assert [json.loads(line) for line in lines.read_text().splitlines()] == first[:2] + again
    assert "| timetable |" in out.read_text()


def test_the_step_cost_benchmark_compares_identical_training():
    # Adaptive capped at the baseline's batch measures its noise statistics and takes its
    # decisions, yet trains exactly as the fixed batch does: what it costs is all the benchmark sees.
    task = TASKS["regression-adam"]
    train_set, _ = task.data(True)
    (fixed, fixed_model, _), (adaptive, adaptive_model, scheduler) = (
        variant_step(task, variant, train_set) for variant in ("fixed", "adaptive"))
    batches = torch.randint(len(train_set), (60, task.baseline_batch_size), generator=torch.Generator().manual_seed(0))
    for indices in batches:
        fixed(indices)
        adaptive(indices)
    assert scheduler.noise_meter.noise.steps >= 3
    assert scheduler.target_at(scheduler.position) == task.baseline_batch_size
    assert scheduler.lr_factor == 1.0
    for a, b in zip(fixed_model.parameters(), adaptive_model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("args, message", [(["--steps", "0"], "--steps must be at least 1, got 0"),
                                           (["--threads", "0"], "--threads must be at least 1, got 0")])
def test_step_cost_names_a_bad_argument(args, message, capsys):
    with pytest.raises(SystemExit):
        step_cost_main(args)
    assert message in capsys.readouterr().err


def test_the_step_cost_command_line_prints_its_ratios(capsys):
    step_cost_main(["--task", "regression-adam", "--quick", "--steps", "40", "--json"])
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["task"] == "regression-adam" and result["block"] == 2 * 16
    for variant in ("fixed again", "adaptive"):
        assert 0 < result[f"{variant}_ratio"] < 10 and result[f"{variant}_ms"] > 0


def test_adaptive_options_reach_the_adaptive_policies_and_name_them():
    chosen = policies(TASKS["cnn-sgd"], sweep=True, adaptive_options={"extra_samples": 0.05, "signal": "norm_test"})
    adaptive = {p.name: p.schedule(20) for p in chosen if p.name.startswith("adaptive")}
    assert list(adaptive) == ["adaptive[extra_samples=0.05,signal='norm_test']",
                              "adaptive-16[extra_samples=0.05,signal='norm_test']"]
    for schedule in adaptive.values():
        assert (schedule.extra_samples, schedule.signal) == (0.05, "norm_test")
    assert [s.start for s in adaptive.values()] == [32, None]
    assert all(not p.name.startswith("adaptive") or "[" in p.name for p in chosen)


def test_adaptive_options_on_the_command_line(tmp_path):
    out = tmp_path / "suite.md"
    main(["--task", "regression-adam", "--quick", "--max-steps", "3", "--seeds", "0", "--policies", "adaptive",
          "--adaptive-options", "extra_samples=0.05", "--json", "--out", str(out)])
    records = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert [r["policy"] for r in records] == ["baseline", "adaptive[extra_samples=0.05]"]
    assert "| adaptive[extra_samples=0.05] |" in out.read_text()


@pytest.mark.parametrize("options, message", [
    (["extra_samples=2"], "--adaptive-options: extra_samples must be in [0, 1), got 2"),
    (["budget=0.1"], "--adaptive-options: Adaptive.__init__() got an unexpected keyword argument 'budget'"),
    (["extra_samples"], "--adaptive-options: 'extra_samples' is not KEY=VALUE"),
    (["start=64"], "--adaptive-options: start is each policy's own"),
])
def test_bad_adaptive_options_are_named(options, message, capsys):
    with pytest.raises(SystemExit):
        main(["--task", "gpt", "--adaptive-options", *options])
    assert message in capsys.readouterr().err
