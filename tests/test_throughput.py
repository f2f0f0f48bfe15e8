"""StepTimes: the step times at each batch size, summarised per window and agreed over the ranks."""

from __future__ import annotations

import copy
import re

import pytest

from adabatch.testing import FakeClock
from adabatch.throughput import StepTimes


def ticking(step_times: StepTimes, clock: FakeClock, steps: list[tuple[int, float]], agree=None) -> None:
    """Train ``steps`` as (batch size, seconds) on ``clock``, ticking after each."""
    for size, seconds in steps:
        clock.advance(seconds)
        step_times.tick(size, agree)


def test_each_window_keeps_the_median_step_of_each_size():
    clock = FakeClock()
    step_times = StepTimes(window=4, clock=clock)
    # The first tick has no step before it to time; an evaluation makes one step look slow.
    ticking(step_times, clock, [(16, 9.0), (16, 1.0), (16, 5.0), (16, 1.2)])
    assert step_times.seconds(16) == pytest.approx(1.2), "the median of 1.0, 5.0 and 1.2"
    ticking(step_times, clock, [(16, 1.4), (32, 2.0), (32, 2.2), (32, 2.4)])
    assert step_times.sizes == [16, 32]
    assert step_times.seconds(16) == pytest.approx(1.3) and step_times.seconds(32) == pytest.approx(2.2)
    assert step_times.seconds(64) is None


def test_a_window_in_progress_is_not_summarised():
    clock = FakeClock()
    step_times = StepTimes(window=8, clock=clock)
    ticking(step_times, clock, [(16, 1.0)] * 7)
    assert step_times.sizes == [] and step_times.line() is None


def test_the_ranks_average_their_medians_and_a_rank_without_a_time_adds_nothing():
    sent = []

    def agree(values: list[float]) -> list[float]:
        # Another rank timed 3.0 s at 16 and nothing at 32 (its first step there was untimed).
        sent.append(list(values))
        return [values[0] + 3.0, values[1] + 0.0, values[2] + 1.0, values[3] + 0.0]

    clock = FakeClock()
    step_times = StepTimes(window=3, clock=clock)
    ticking(step_times, clock, [(16, 0.0), (16, 1.0), (32, 2.0)], agree)
    assert sent == [[1.0, 2.0, 1.0, 1.0]], "the sums of the medians, then how many ranks timed each size"
    assert step_times.seconds(16) == pytest.approx(2.0) and step_times.seconds(32) == pytest.approx(2.0)


def test_the_line_through_the_sizes_timed():
    clock = FakeClock()
    step_times = StepTimes(window=2, clock=clock)
    ticking(step_times, clock, [(16, 2e-3), (16, 2e-3), (32, 3e-3), (32, 3e-3), (64, 5e-3), (64, 5e-3)])
    fixed, per_sample = step_times.line()
    assert fixed == pytest.approx(1e-3) and per_sample == pytest.approx(1e-3 / 16)


def test_a_size_not_trained_for_the_horizon_is_forgotten():
    """Only the size being trained is timed anew: after ``horizon`` windows at 32, the time of
    16 (taken before the machine slowed down) is no longer compared with it."""
    clock = FakeClock()
    step_times = StepTimes(window=2, horizon=3, clock=clock)
    ticking(step_times, clock, [(16, 1.0)] * 4 + [(32, 3.0)] * 4)
    assert step_times.sizes == [16, 32] and step_times.state_dict()["ages"] == [[16, 2], [32, 0]]
    ticking(step_times, clock, [(32, 3.0)] * 2)
    assert step_times.sizes == [32] and step_times.line() is None


def test_the_slope_is_taken_standard_errors_low_from_the_spread_of_each_sizes_summaries():
    """Two close sizes whose window medians scatter by 5%: the 4% between them is not resolved,
    so one standard error low the cost per sample is nil; far apart sizes are resolved."""
    def timed(table: dict[int, list[float]]) -> StepTimes:
        step_times = StepTimes()
        step_times.load_state_dict({"table": [[size, *times] for size, times in table.items()]})
        return step_times

    close = timed({32: [1.0, 1.05, 0.95, 1.0], 36: [1.04, 0.99, 1.09, 1.04]})
    assert close.line()[1] == pytest.approx(0.01)
    assert close.line(1.0) == (pytest.approx(1.02), 0.0), "within the noise: no cost per sample"
    far = timed({32: [1.0, 1.05, 0.95, 1.0], 128: [4.0, 4.2, 3.8, 4.0]})
    fixed, per_sample = far.line(1.0)
    assert 0 < per_sample < 3.0 / 96 and fixed > 0, "resolved: the slope, one standard error low"
    assert timed({32: [1.0], 36: [1.04]}).line(1.0) == timed({32: [1.0], 36: [1.04]}).line(), \
        "no spread measured: the slope as it is"


def test_a_resumed_run_summarises_at_the_same_steps_and_times_the_step_after_the_checkpoint():
    steps = [(16, 1.0)] * 5 + [(32, 2.0)] * 6
    clock = FakeClock()
    whole = StepTimes(window=4, clock=clock)
    ticking(whole, clock, steps)
    clock = FakeClock()
    first = StepTimes(window=4, clock=clock)
    ticking(first, clock, steps[:6])
    state = copy.deepcopy(first.state_dict())
    assert state["running"] is True and state["window"][0] == 2
    resumed = StepTimes(window=4, clock=FakeClock())
    resumed.load_state_dict(state)
    ticking(resumed, resumed.clock, steps[6:])
    assert resumed.state_dict() == whole.state_dict()


@pytest.mark.parametrize(
    "state, message",
    [
        ({}, "step times state_dict must hold a 'table' list"),
        ({"table": [[0, 1.0]]}, "step times state_dict rows are [batch_size, seconds, ...], got [0, 1.0]"),
        ({"table": [[16]]}, "step times state_dict rows are [batch_size, seconds, ...], got [16]"),
        ({"table": [[16, -1.0]]}, "step times state_dict rows are [batch_size, seconds, ...], got [16, -1.0]"),
        ({"table": [], "window": [9]}, "step times state_dict['window'] must be [steps, [batch_size, seconds...]...]"),
        ({"table": [], "running": 1}, "step times state_dict['running'] must be True or False, got 1"),
        ({"table": [[16, 1.0]], "ages": [[32, 0]]},
         "step times state_dict['ages'] must hold [batch_size, windows] for each size"),
        ({"table": [[16, 1.0]], "ages": [[[16], 0]]},
         "step times state_dict['ages'] must hold [batch_size, windows] for each size"),
        ({"table": [[16, 1.0]], "ages": [[16, 32]]}, "with 0 <= windows < horizon=32, got [[16, 32]]"),
    ],
)
def test_a_bad_state_is_refused_by_name(state, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        StepTimes().load_state_dict(state)


@pytest.mark.parametrize("name, value", [("window", 0), ("keep", 1.5), ("horizon", 0)])
def test_arguments_are_validated(name, value):
    with pytest.raises(ValueError, match=f"{name} must be a positive integer, got {value}"):
        StepTimes(**{name: value})
