"""``adabatch plot`` on the event files of real training runs.

Two short runs train a small MLP on 256 random samples for three epochs under
``Step(start=8, factor=2, milestones=[1, 2])`` with ``lr_scaling="sqrt"`` (32 + 16 + 8 = 56
steps), each writing through a real ``SummaryWriter``: ``step-sqrt`` (DataLoader workers, no
noise, no memory) and ``noise`` (two parameter groups, the noise scale measured, a simulated
memory device so the memory cap is logged). The tests read the curves back, draw them through
the command line, and read the PNG back.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.tensorboard import SummaryWriter

from adabatch import AdaptiveBatchSampler, BatchSizeScheduler, schedules
from adabatch.cli import main
from adabatch.plot import (FIGURE_WIDTH, LEGEND_HEIGHT, QUANTITIES, ROW_HEIGHT, Curve, NoCurvesError, plot_runs,
                           read_run, read_runs)
from adabatch.testing import FakeMemory

image = pytest.importorskip("matplotlib.image")

NUM_SAMPLES = 256
EPOCHS = 3
START = 8
BASE_LRS = (0.1, 0.05)
# Step(start=8, factor=2, milestones=[1, 2]): 256 / 8 + 256 / 16 + 256 / 32 steps.
EXPECTED_SIZES = [8] * 32 + [16] * 16 + [32] * 8
DPI = 60
BLUE, ORANGE = (0x1F / 255, 0x77 / 255, 0xB4 / 255), (0xFF / 255, 0x7F / 255, 0x0E / 255)  # C0, C1


def train_run(logdir: Path, *, noise_and_memory: bool) -> list[dict[str, Any]]:
    """Train one run writing to ``logdir``; return, for each step, what the scheduler logged."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    inputs = torch.randn(NUM_SAMPLES, 8)
    # A regression whose targets stand far from the untrained model's outputs: the true gradient
    # stands above the noise, so the noise scale is finite from the first measurement.
    data = TensorDataset(inputs, 5 + inputs @ torch.linspace(-1, 1, 8))
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    groups = [{"params": model[0].parameters(), "lr": BASE_LRS[0]}]
    if noise_and_memory:
        groups.append({"params": model[2].parameters(), "lr": BASE_LRS[1]})
    else:
        groups[0]["params"] = model.parameters()
    optimizer = torch.optim.SGD(groups, lr=BASE_LRS[0])
    memory = None
    if noise_and_memory:
        memory = FakeMemory(capacity=200_000, fixed=10_000, per_sample=1_000)
        memory.attach(model)
    writer = SummaryWriter(str(logdir))
    scheduler = BatchSizeScheduler(
        optimizer, schedules.Step(start=START, factor=2, milestones=[1, 2]), lr_scaling="sqrt", writer=writer,
        measure_noise=noise_and_memory, noise_interval=64, memory=memory,
    )
    sampler = AdaptiveBatchSampler(data, scheduler, shuffle=True, seed=0)
    loader = DataLoader(data, batch_sampler=sampler, num_workers=0 if noise_and_memory else 2)
    logged = []
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        for x, y in loader:
            samples_before = scheduler.samples_seen
            scheduler.train_step((x, y), lambda batch: F.mse_loss(model(batch[0]).squeeze(1), batch[1]))
            step = {"step": scheduler.steps - 1, "samples": samples_before, "batch_size": len(x),
                    "epoch": samples_before / NUM_SAMPLES, "lrs": scheduler.get_last_lr()}
            if noise_and_memory:
                step["cap"] = scheduler.memory.cap
                noise = scheduler.noise_meter.noise
                step["noise_scale"] = noise.noise_scale if noise.steps else None
                step["noise_scale_lower"] = noise.lower_bound() if noise.steps else None
            logged.append(step)
    writer.close()
    return logged


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[dict[str, Any]]]]:
    root = tmp_path_factory.mktemp("logs") / "runs"
    logged = {name: train_run(root / name, noise_and_memory=name == "noise") for name in ("noise", "step-sqrt")}
    return root, logged


def read_png(path: Path) -> np.ndarray:
    pixels = image.imread(str(path))
    assert pixels.dtype == np.float32 and pixels.ndim == 3 and pixels.shape[2] in (3, 4)
    return pixels


def expected_shape(rows: int, dpi: int = DPI) -> tuple[int, int]:
    return round((LEGEND_HEIGHT + ROW_HEIGHT * rows) * dpi), round(FIGURE_WIDTH * dpi)


def colour_pixels(pixels: np.ndarray, colour: tuple[float, float, float]) -> int:
    return int((np.abs(pixels[..., :3] - np.array(colour, dtype=np.float32)).max(axis=-1) < 0.06).sum())


def assert_not_blank(pixels: np.ndarray) -> None:
    non_white = (pixels[..., :3] < 0.9).any(axis=-1).mean()
    assert non_white > 0.02, f"only {non_white:.1%} of the image is drawn on"


@pytest.mark.parametrize("name", ["noise", "step-sqrt"])
def test_curves_read_back_equal_what_was_logged(runs: tuple[Path, dict], name: str) -> None:
    root, logged = runs
    run = read_run(root / name)
    assert run.label == name and run.path == root / name
    steps = logged[name]
    assert [step["batch_size"] for step in steps] == EXPECTED_SIZES
    assert [step["step"] for step in steps] == list(range(len(EXPECTED_SIZES)))
    for curves, x in ((run.by_step, [s["step"] for s in steps]), (run.by_samples, [s["samples"] for s in steps])):
        assert curves["batch_size"] == Curve(tuple(x), tuple(float(s["batch_size"]) for s in steps))
        assert curves["target_batch_size"] == curves["batch_size"]  # 256 samples: no balanced epoch end
        assert curves["epoch"].x == tuple(x)
        assert curves["epoch"].values == pytest.approx([s["epoch"] for s in steps], rel=1e-6)
        for group, base_lr in enumerate(BASE_LRS if name == "noise" else BASE_LRS[:1]):
            lr = curves[f"lr/group_{group}"]
            assert lr.x == tuple(x)
            assert lr.values == pytest.approx([s["lrs"][group] for s in steps], rel=1e-6)
            # sqrt scaling from the start size: the LR grows by sqrt(2) at each doubling
            assert lr.values == pytest.approx([base_lr * math.sqrt(s["batch_size"] / START) for s in steps], rel=1e-6)
        if name == "noise":
            measured = [(x_i, s["noise_scale"]) for x_i, s in zip(x, steps) if s["noise_scale"] is not None]
            assert 1 < len(measured) < len(steps)  # measured every 64 samples, logged from the first measurement on
            assert curves["noise/noise_scale"].x == tuple(x_i for x_i, _ in measured)
            assert curves["noise/noise_scale"].values == pytest.approx([v for _, v in measured], rel=1e-5)
            assert all(math.isfinite(v) and v > 0 for v in curves["noise/noise_scale"].values)
            lower = [s["noise_scale_lower"] for s in steps if s["noise_scale_lower"] is not None]
            assert curves["noise/noise_scale_lower"].values == pytest.approx(lower, rel=1e-5, nan_ok=True)
            bounded = [(b, v) for b, v in zip(lower, curves["noise/noise_scale"].values) if math.isfinite(b)]
            assert len(bounded) > 1 and all(b <= v for b, v in bounded), "from the second measurement on, below"
            assert curves["memory/cap"] == Curve(tuple(x), tuple(float(s["cap"]) for s in steps))
            assert len(set(curves["memory/cap"].values)) > 1  # the fit through the origin, then the line
        else:
            assert not any(n.startswith(("noise/", "memory/")) or n == "lr/group_1" for n in curves)
    assert set(run.by_step) - {"samples_seen"} == set(run.by_samples)
    assert run.by_step["samples_seen"].values == tuple(float(s["samples"]) for s in steps)


def test_plot_writes_the_default_png_with_every_quantity(runs: tuple[Path, dict], capsys) -> None:
    root, _ = runs
    assert main(["plot", str(root / "noise"), "--dpi", str(DPI)]) == 0
    output = root / "noise" / "adabatch.png"
    assert capsys.readouterr().out.splitlines() == [f"wrote {output} (1 run: noise)"]
    pixels = read_png(output)
    assert pixels.shape[:2] == expected_shape(rows=4)
    assert_not_blank(pixels)
    assert colour_pixels(pixels, BLUE) > 500  # eight panels of curves, not just the legend's line
    assert colour_pixels(pixels, ORANGE) == 0


def test_quantities_no_run_logged_are_dropped(runs: tuple[Path, dict], tmp_path: Path, capsys) -> None:
    root, _ = runs
    output = tmp_path / "made" / "here" / "sqrt.png"
    assert main(["plot", str(root / "step-sqrt"), "-o", str(output), "--dpi", str(DPI)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"wrote {output} (1 run: step-sqrt)",
        "not logged by any run, so not drawn: gradient noise scale, memory cap (micro-batch)",
    ]
    pixels = read_png(output)
    assert pixels.shape[:2] == expected_shape(rows=2)
    assert_not_blank(pixels)
    assert colour_pixels(pixels, BLUE) > 200


def test_a_folder_of_runs_overlays_them(runs: tuple[Path, dict], tmp_path: Path, capsys) -> None:
    root, _ = runs
    output = tmp_path / "both.png"
    assert main(["plot", str(root), "-o", str(output), "--dpi", str(DPI)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"wrote {output} (2 runs: noise, step-sqrt)"]
    pixels = read_png(output)
    assert pixels.shape[:2] == expected_shape(rows=4)
    blue, orange = colour_pixels(pixels, BLUE), colour_pixels(pixels, ORANGE)
    assert blue > 500 and orange > 500, (blue, orange)


def test_several_run_dirs_are_labelled_apart(runs: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = runs
    assert [run.label for run in read_runs([root / "step-sqrt", root / "noise"])] == ["step-sqrt", "noise"]
    assert [run.label for run in read_runs([root])] == ["noise", "step-sqrt"]
    assert [run.label for run in read_runs([root, root / "noise"])] == ["runs/noise", "runs/step-sqrt", "noise"]
    drawn = plot_runs(read_runs([root / "step-sqrt", root / "noise"]), tmp_path / "two.png", dpi=DPI)
    assert drawn == [quantity.title for quantity in QUANTITIES]
    assert colour_pixels(read_png(tmp_path / "two.png"), ORANGE) > 500  # the second run, noise, is orange


def test_python_m_adabatch_plot(runs: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = runs
    output = tmp_path / "curves.png"
    completed = subprocess.run(
        [sys.executable, "-m", "adabatch", "plot", str(root / "noise"), "-o", str(output), "--dpi", str(DPI)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == f"wrote {output} (1 run: noise)\n"
    pixels = read_png(output)
    assert pixels.shape[:2] == expected_shape(rows=4)
    assert_not_blank(pixels)


def write_other_scalars(logdir: Path) -> None:
    writer = SummaryWriter(str(logdir))
    for step in range(3):
        writer.add_scalar("train/loss", 1.0 / (step + 1), step)
    writer.close()


@pytest.mark.parametrize("case, message", [
    ("missing", "is not a folder"),
    ("empty", "no TensorBoard event files (events.out.tfevents.*) under"),
    ("other-tags", "no adabatch curves under"),
])
def test_a_folder_without_curves_is_a_clear_error(tmp_path: Path, capsys, case: str, message: str) -> None:
    folder = tmp_path / case
    if case != "missing":
        folder.mkdir()
    if case == "other-tags":
        write_other_scalars(folder / "sub")
    assert main(["plot", str(folder)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("adabatch plot: error: ") and message in error and str(folder) in error, error
    assert not (folder / "adabatch.png").exists()
    with pytest.raises(NoCurvesError, match="no TensorBoard event files|is not a folder|no adabatch curves"):
        read_runs([folder])


def test_a_run_dir_without_curves_is_named_among_good_ones(runs: tuple[Path, dict], tmp_path: Path, capsys) -> None:
    root, _ = runs
    empty = tmp_path / "empty-run"
    empty.mkdir()
    assert main(["plot", str(root / "noise"), str(empty), "-o", str(tmp_path / "x.png")]) == 2
    assert f"under {empty}" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("argv, message", [
    (["-o", "curves.txt"], "output must end in an image format's suffix"),
    (["-o", "curves"], "output must end in an image format's suffix"),
    (["--dpi", "0"], "dpi must be a positive integer, got 0"),
])
def test_bad_options_are_clear_errors(runs: tuple[Path, dict], tmp_path: Path, capsys, argv, message) -> None:
    root, _ = runs
    argv = [tmp_path / a if a.startswith("curves") else a for a in argv]
    assert main(["plot", str(root / "noise"), *map(str, argv)]) == 2
    assert message in capsys.readouterr().err


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)


def test_missing_matplotlib_names_the_extra(runs: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = runs
    # A None entry in sys.modules makes `import matplotlib` raise ImportError, as when it is not installed.
    completed = run_python(
        "import sys; sys.modules['matplotlib'] = None\n"
        "from adabatch.cli import main\n"
        f"raise SystemExit(main(['plot', {str(root / 'noise')!r}, '-o', {str(tmp_path / 'none.png')!r}]))"
    )
    assert completed.returncode == 1, completed.stderr
    assert completed.stderr.startswith("adabatch plot: error: adabatch plot needs matplotlib")
    assert 'pip install "adabatch[plot]"' in completed.stderr
    assert not (tmp_path / "none.png").exists()


def test_import_adabatch_and_demo_do_not_import_matplotlib() -> None:
    completed = run_python(
        "import sys\n"
        "import adabatch, adabatch.plot, adabatch.demo\n"
        "from adabatch.cli import main\n"
        "try:\n"
        "    main(['demo', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] == 'matplotlib'))"
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.splitlines()[-1] == "[]"
