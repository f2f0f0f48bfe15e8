"""``adabatch plot``: one figure of the curves adabatch wrote to TensorBoard.

Reading and drawing are separate. :func:`read_run` reads one run folder's event files into
:class:`RunCurves` (every ``adabatch/`` and ``adabatch_vs_samples/`` scalar, as
:mod:`adabatch.loggers` wrote it); :func:`read_runs` finds the run folders under the folders
given and labels them; :func:`plot_runs` draws the batch size, the effective learning rate,
the gradient noise scale and the memory cap of every run, each against samples seen (left
column) and against optimizer steps (right column), into one image.

A quantity that no run logged (the noise scale unless it is measured, the memory cap unless
memory is) is left out: its row is dropped, both columns together. A run that lacks a drawn
quantity is named in that panel's "not logged" note.

matplotlib is optional (the ``plot`` extra) and imported only when a figure is drawn, through
its Agg canvas, so pyplot's global backend is never touched.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ._validation import check_positive_int
from .demo import MissingExtrasError
from .loggers import SAMPLES_PREFIX, STEP_PREFIX

__all__ = ["Curve", "NoCurvesError", "QUANTITIES", "Quantity", "RunCurves", "find_runs", "plot_runs",
           "read_run", "read_runs"]

#: The x-axes, left column first: the tag prefix each is logged under, and its label.
AXES = ((SAMPLES_PREFIX, "samples seen"), (STEP_PREFIX, "optimizer steps"))
#: The figure's size in inches: its width, each row's height, and the run legend's band on top.
FIGURE_WIDTH, ROW_HEIGHT, LEGEND_HEIGHT = 11, 2.4, 0.9


class NoCurvesError(ValueError):
    """Raised when a folder holds no TensorBoard event files, or none with adabatch's curves."""


@dataclass(frozen=True)
class Curve:
    """One logged scalar: its x positions (steps, or samples seen) and values, in order."""

    x: tuple[int, ...]
    values: tuple[float, ...]


@dataclass(frozen=True)
class RunCurves:
    """The adabatch curves of one run.

    Args:
        path (Path): the folder the event files are in.
        label (str): the run's name in a figure's legend.
        curves (mapping): x-axis prefix (``"adabatch"``: against steps, ``"adabatch_vs_samples"``:
            against samples seen) to scalar name (the tag after the prefix, e.g. ``"batch_size"``,
            ``"lr/group_0"``, ``"noise/noise_scale"``) to :class:`Curve`.
    """

    path: Path
    label: str
    curves: Mapping[str, Mapping[str, Curve]] = field(repr=False)

    @property
    def by_step(self) -> Mapping[str, Curve]:
        """The curves against optimizer steps."""
        return self.curves.get(STEP_PREFIX, {})

    @property
    def by_samples(self) -> Mapping[str, Curve]:
        """The curves against samples seen."""
        return self.curves.get(SAMPLES_PREFIX, {})


def _is_event_file(name: str) -> bool:
    return "tfevents" in name  # tensorboard's own test (io_wrapper.IsTensorFlowEventsFile)


def find_runs(run_dir: str | os.PathLike) -> list[Path]:
    """The folders under ``run_dir`` (itself included) that hold TensorBoard event files, sorted."""
    found = [Path(folder) for folder, _, files in os.walk(run_dir) if any(_is_event_file(name) for name in files)]
    return sorted(found)


def read_run(path: str | os.PathLike, label: str | None = None) -> RunCurves:
    """Read the adabatch curves from the event files in one folder (not its subfolders).

    Args:
        path (str or Path): a folder holding a ``SummaryWriter``'s event files.
        label (str, optional): the run's name in a legend. Default: the folder's name.

    Raises:
        NoCurvesError: if the folder holds no event files, or none of their scalars is adabatch's.

    Example:
        >>> run = read_run("runs/exp")
        >>> run.by_samples["batch_size"].values[:3]
        (32.0, 32.0, 32.0)
    """
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    path = Path(path)
    if not path.is_dir() or not any(_is_event_file(entry.name) for entry in path.iterdir()):
        raise NoCurvesError(f"no TensorBoard event files (events.out.tfevents.*) in {path}")
    events = EventAccumulator(str(path), size_guidance={SCALARS: 0}).Reload()
    curves: dict[str, dict[str, Curve]] = {}
    for tag in events.Tags()["scalars"]:
        prefix, _, name = tag.partition("/")
        if prefix in (STEP_PREFIX, SAMPLES_PREFIX) and name:
            scalars = events.Scalars(tag)
            curves.setdefault(prefix, {})[name] = Curve(tuple(event.step for event in scalars),
                                                        tuple(event.value for event in scalars))
    if not curves:
        raise NoCurvesError(
            f"no adabatch curves in the event files in {path}: none of their scalars is tagged {STEP_PREFIX}/ or "
            f"{SAMPLES_PREFIX}/ (give BatchSizeScheduler a writer=SummaryWriter(...) to write them)"
        )
    return RunCurves(path, label if label is not None else path.resolve().name, curves)


def read_runs(run_dirs: Sequence[str | os.PathLike]) -> list[RunCurves]:
    """Read every run under the folders given, labelled by folder name.

    Each folder under a ``run_dir`` (itself included) whose event files hold adabatch's curves is
    a run; folders whose event files hold none are skipped. With one ``run_dir``, a run is
    labelled by its folder relative to ``run_dir`` (``run_dir`` itself by its own name); with
    several, relative to the folder above its ``run_dir``, so that runs from different
    ``run_dir`` keep apart.

    Args:
        run_dirs (sequence of str or Path): one or more folders.

    Raises:
        NoCurvesError: naming the first ``run_dir`` that is not a folder, holds no event files, or
            holds no adabatch curves.
    """
    runs: list[RunCurves] = []
    for run_dir in map(Path, run_dirs):
        if not run_dir.is_dir():
            raise NoCurvesError(f"{run_dir} is not a folder")
        folders = find_runs(run_dir)
        if not folders:
            raise NoCurvesError(f"no TensorBoard event files (events.out.tfevents.*) under {run_dir}")
        base = run_dir.resolve() if len(run_dirs) == 1 else run_dir.resolve().parent
        found = []
        for folder in folders:
            relative = folder.resolve().relative_to(base).as_posix()
            try:
                found.append(read_run(folder, relative if relative != "." else run_dir.resolve().name))
            except NoCurvesError:
                continue
        if not found:
            raise NoCurvesError(
                f"no adabatch curves under {run_dir}: its event files hold no scalar tagged {STEP_PREFIX}/ or "
                f"{SAMPLES_PREFIX}/ (give BatchSizeScheduler a writer=SummaryWriter(...) to write them)"
            )
        runs.extend(found)
    return runs


@dataclass(frozen=True)
class Quantity:
    """One row of the figure: the scalars that draw it, and how.

    Args:
        title (str): the row's y-axis label.
        names (tuple of str): the scalar names drawn, each with its own line style, in order.
        prefix (str): also draw every scalar whose name starts with this (the parameter groups'
            learning rates), ordered by the number after it. Default: none.
        log (bool): a logarithmic y-axis, when every value drawn is positive (base 2 if
            ``held``: sizes that double read as 32, 64, 128). Default: ``False``.
        held (bool): draw each value held until the next one (a batch size stays until it
            changes). Default: ``False``.
        positive (bool): draw only positive values (a lower bound of 0 says nothing). Default:
            ``False``.
    """

    title: str
    names: tuple[str, ...] = ()
    prefix: str = ""
    log: bool = False
    held: bool = False
    positive: bool = False

    def series(self, curves: Mapping[str, Curve]) -> list[tuple[str, Curve]]:
        """The ``(scalar name, curve)`` pairs of this quantity in ``curves``, in drawing order."""
        pairs = [(name, curves[name]) for name in self.names if name in curves]
        if self.prefix:
            grouped = [name for name in curves if name.startswith(self.prefix) and name[len(self.prefix):].isdigit()]
            pairs += [(name, curves[name]) for name in sorted(grouped, key=lambda n: int(n[len(self.prefix):]))]
        return pairs


#: The rows of the figure, top to bottom.
QUANTITIES = (
    Quantity("batch size", names=("batch_size", "target_batch_size"), log=True, held=True),
    Quantity("effective learning rate", prefix="lr/group_", log=True),
    Quantity("gradient noise scale", names=("noise/noise_scale", "noise/noise_scale_lower"), log=True, positive=True),
    Quantity("memory cap (micro-batch)", names=("memory/cap",), held=True),
)

#: How a scalar is named in a panel's legend, when a panel draws several per run.
SERIES_LABELS = {"batch_size": "trained", "target_batch_size": "scheduled", "noise/noise_scale": "smoothed",
                 "noise/noise_scale_lower": "lower bound"}
LINE_STYLES = ("-", "--", ":", "-.")


def _finite(curve: Curve, positive: bool = False) -> tuple[list[int], list[float]]:
    """The curve without its non-finite values (a noise scale is ``inf`` while the gradient is all
    noise), and if ``positive`` without those not above zero."""
    points = [(x, value) for x, value in zip(curve.x, curve.values)
              if math.isfinite(value) and (value > 0 or not positive)]
    return [x for x, _ in points], [value for _, value in points]


def _canvas_class() -> Any:
    """matplotlib's Agg canvas, importing matplotlib only now."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError as error:
        raise MissingExtrasError(
            f'adabatch plot needs matplotlib ({error}); install it with: pip install "adabatch[plot]"'
        ) from error
    return FigureCanvasAgg


def plot_runs(runs: Sequence[RunCurves], output: str | os.PathLike, dpi: int = 100) -> list[str]:
    """Draw the runs' curves into one image and return the titles of the rows drawn.

    Rows are the :data:`QUANTITIES` at least one run logged; the left column is against samples
    seen, the right against optimizer steps. Each run has one colour; within a panel the line
    style tells a run's scalars apart (trained and scheduled batch size, parameter groups).

    Args:
        runs (sequence of RunCurves): what to draw, e.g. from :func:`read_runs`.
        output (str or Path): the image file; its suffix (``.png``, ``.svg``, ``.pdf``...) gives
            the format. Missing parent folders are made.
        dpi (int): pixels per inch of a raster image. Default: 100.

    Raises:
        MissingExtrasError: if matplotlib is not installed.
        ValueError: if ``runs`` is empty, ``output``'s suffix is not an image format, or ``dpi``
            is not a positive integer.

    Example:
        >>> plot_runs(read_runs(["runs"]), "runs/adabatch.png")
        ['batch size', 'effective learning rate']
    """
    canvas_class = _canvas_class()
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    if not runs:
        raise ValueError("runs must hold at least one RunCurves, got none")
    dpi = check_positive_int("dpi", dpi)
    output = Path(output)
    formats = canvas_class.get_supported_filetypes()
    if output.suffix[1:].lower() not in formats:
        suffixes = ", ".join(f".{name}" for name in sorted(formats))
        raise ValueError(f"output must end in an image format's suffix ({suffixes}), got {str(output)!r}")
    rows = [quantity for quantity in QUANTITIES if any(quantity.series(run.by_step) or
                                                       quantity.series(run.by_samples) for run in runs)]
    if not rows:  # runs that logged only other scalars still get a figure, saying what is missing
        rows = list(QUANTITIES[:1])
    figure = Figure(figsize=(FIGURE_WIDTH, LEGEND_HEIGHT + ROW_HEIGHT * len(rows)), dpi=dpi, layout="constrained")
    canvas_class(figure)
    axes = figure.subplots(len(rows), 2, sharex="col", squeeze=False)
    colours = [f"C{i % 10}" for i in range(len(runs))]  # matplotlib's ten-colour cycle
    for row, quantity in enumerate(rows):
        for column, (prefix, _) in enumerate(AXES):
            _draw_panel(axes[row][column], quantity, [run.curves.get(prefix, {}) for run in runs],
                        [run.label for run in runs], colours, legend=column == 0)
            axes[row][column].xaxis.set_major_formatter(EngFormatter())
        axes[row][0].set_ylabel(quantity.title)
    for column, (_, x_label) in enumerate(AXES):
        axes[0][column].set_title(f"against {x_label}")
        axes[-1][column].set_xlabel(x_label)
    figure.legend([_legend_line(colour, "-") for colour in colours], [run.label for run in runs],
                  loc="outside upper center", ncols=min(len(runs), 4), frameon=False)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output)
    return [quantity.title for quantity in rows]


def _legend_line(colour: str, style: str) -> Any:
    from matplotlib.lines import Line2D

    return Line2D([], [], color=colour, linestyle=style)


def _series_label(quantity: Quantity, name: str) -> str:
    if quantity.prefix and name.startswith(quantity.prefix):
        return f"group {name[len(quantity.prefix):]}"
    return SERIES_LABELS.get(name, name)


def _draw_panel(axis: Any, quantity: Quantity, curves_of_runs: list[Mapping[str, Curve]], labels: list[str],
                colours: list[str], legend: bool) -> None:
    """Draw one quantity of every run against one x-axis, and name the runs that did not log it;
    with ``legend``, say which line style is which of a run's scalars."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, ScalarFormatter

    styles: dict[str, str] = {}
    missing, not_finite, drawn = [], [], []
    for curves, label, colour in zip(curves_of_runs, labels, colours):
        logged = [(name, *_finite(curve, quantity.positive)) for name, curve in quantity.series(curves)]
        series = [(name, x, values) for name, x, values in logged if x]
        if not series:
            (not_finite if logged else missing).append(label)
        for name, x, values in series:
            style = styles.setdefault(name, LINE_STYLES[len(styles) % len(LINE_STYLES)])
            axis.plot(x, values, color=colour, linestyle=style, linewidth=1.4,
                      drawstyle="steps-post" if quantity.held else "default")
            drawn.extend(values)
    if quantity.log and drawn and min(drawn) > 0:
        if quantity.held:
            axis.set_yscale("log", base=2)
            axis.yaxis.set_major_formatter(ScalarFormatter())
        else:  # 0.05, 0.1, 0.2 rather than 10^-1 alone, when the values span few decades
            axis.set_yscale("log")
            if max(drawn) / min(drawn) < 100:
                axis.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
            axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            axis.yaxis.set_minor_formatter(NullFormatter())
    if legend and len(styles) > 1:
        axis.legend([_legend_line("0.3", style) for style in styles.values()],
                    [_series_label(quantity, name) for name in styles], fontsize="small", frameon=False)
    notes = [f"{what}: {', '.join(runs)}" for what, runs in (("not logged", missing), ("no finite value", not_finite))
             if runs]
    if notes:
        axis.text(0.5, 0.03 if drawn else 0.5, "\n".join(notes), transform=axis.transAxes, ha="center",
                  va="bottom" if drawn else "center", color="0.45", fontsize="small" if drawn else "medium")
    axis.grid(True, which="major", alpha=0.3)
