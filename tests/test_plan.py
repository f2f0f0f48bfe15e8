"""The plan of batches on its own: what is drawn is what is counted, and it survives a checkpoint."""

from __future__ import annotations

import pytest

from adabatch.layout import EpochLayout
from adabatch.plan import BatchPlan, PlannedBatch


def growing(position: int) -> int:
    return 4 if position < 20 else 8


def test_a_drawn_batch_is_the_one_counted_even_if_the_target_changes_in_between() -> None:
    sizes = {"now": 4}
    plan = BatchPlan(lambda position: sizes["now"])
    plan.layout = EpochLayout(100)
    assert plan.draw(0) == PlannedBatch(0, 4, 4)
    sizes["now"] = 10  # a later decision (an adaptive schedule, the memory cap)
    assert plan.batch_at(0) == PlannedBatch(0, 4, 4)
    assert plan.batch_at(4) == PlannedBatch(4, 10, 10)  # not drawn: decided now
    plan.advance(0, 4)
    assert (plan.position, plan.samples_seen, plan.steps, plan.tracking) == (4, 4, 1, True)
    assert plan.state_dict()["plan"] == []  # trained batches are forgotten


def test_the_record_round_trips_through_a_state_dict() -> None:
    plan = BatchPlan(growing)
    plan.layout = EpochLayout(30)
    position = 0
    for _ in range(3):
        start, size, _ = plan.draw(position)
        position = start + size
    plan.advance(0, 4)
    state = plan.state_dict()
    restored = BatchPlan(lambda position: 1)  # a target that would decide otherwise
    restored.layout = EpochLayout(30)
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    assert restored.batch_at(4) == plan.batch_at(4) == PlannedBatch(4, 4, 4)


def test_a_record_that_does_not_split_over_the_replicas_is_decided_again() -> None:
    plan = BatchPlan(lambda position: 6)
    plan.load_state_dict({"position": 0, "samples_seen": 0, "steps": 0, "plan": [[0, 0, 5, 5]]})
    plan.layout = EpochLayout(60, num_replicas=2)
    assert plan.batch_at(0) == PlannedBatch(0, 6, 6)


def test_skip_to_never_moves_backward() -> None:
    plan = BatchPlan(growing)
    plan.skip_to(40)
    plan.skip_to(10)
    assert plan.position == 40 and plan.tracking


@pytest.mark.parametrize("key", ["position", "samples_seen", "steps"])
@pytest.mark.parametrize("value", [-1, 1.5, "3", True, None])
def test_a_bad_counter_is_refused_naming_its_key(key: str, value: object) -> None:
    state = {"position": 0, "samples_seen": 0, "steps": 0, "plan": []}
    state[key] = value
    with pytest.raises(ValueError, match=f"state_dict\\['{key}'\\] must be a non-negative integer"):
        BatchPlan(growing).load_state_dict(state)
