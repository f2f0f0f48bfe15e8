"""What each remainder policy of AdaptiveBatchSampler promises, for any dataset, schedule, constraints and replicas.

Every rank is built from its own scheduler and sampler, as separate processes would build them, and
driven like a training loop: ``set_epoch`` each epoch (or never, which is documented to come to the
same), ``scheduler.step(len(batch))`` after each batch. The expected order of the data is the documented one: one permutation per epoch, seeded
with ``seed + epoch`` as ``DistributedSampler`` seeds it, laid end to end.
"""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from dataclasses import dataclass

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from adabatch import AdaptiveBatchSampler, BatchSizeScheduler, schedules
from adabatch.schedules import Progress

EPOCHS = 3

pytestmark = [
    pytest.mark.filterwarnings("ignore:the schedule asked for batch size:UserWarning"),
    # The sampler plans every batch; a training loop that steps with len(batch) must never disagree.
    pytest.mark.filterwarnings(r"error:scheduler\.step\(\) was told:UserWarning"),
]


@dataclass
class Setup:
    """One training configuration, shared by all ranks."""

    dataset_size: int
    schedule: schedules.Schedule
    num_replicas: int = 1
    min_batch_size: int = 1
    max_batch_size: int | None = None
    multiple_of: int = 1
    shuffle: bool = True
    seed: int = 0
    calls_set_epoch: bool = True  # without it, each new iteration is documented to continue with the next epoch

    @property
    def lowest(self) -> int:
        """Smallest allowed batch per replica."""
        return math.ceil(self.min_batch_size / self.multiple_of) * self.multiple_of

    @property
    def cap_per_replica(self) -> int:
        caps = [self.dataset_size // self.num_replicas]
        if self.max_batch_size is not None:
            caps.append(self.max_batch_size // self.num_replicas)
        return min(caps)

    @property
    def highest(self) -> int:
        """Largest allowed batch per replica that is a multiple of multiple_of."""
        return self.cap_per_replica // self.multiple_of * self.multiple_of

    def feasible(self, remainder: str) -> bool:
        """Whether the documented rules allow this configuration at all."""
        if self.dataset_size // self.num_replicas < self.min_batch_size or self.highest < self.lowest:
            return False
        # "balance" may have to keep a tail of up to 2 * min_batch_size - 1 per replica together; such a
        # tail is not rounded to multiple_of, so it only has to fit under the cap itself.
        return remainder != "balance" or self.cap_per_replica >= min(2 * self.min_batch_size - 1,
                                                                     self.dataset_size // self.num_replicas)

    def target(self, position: int) -> int:
        """The documented constrained size at a stream position: the schedule's request, rounded to the
        nearest multiple of multiple_of per replica, clamped to the floor and the cap."""
        requested = self.schedule(Progress(samples=position, dataset_size=self.dataset_size))
        per_replica = math.floor(requested / self.num_replicas / self.multiple_of + 0.5) * self.multiple_of
        return min(max(per_replica, self.lowest), self.highest) * self.num_replicas

    def permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.dataset_size))
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)
        return torch.randperm(self.dataset_size, generator=generator).tolist()

    def build(self, remainder: str, rank: int) -> tuple[BatchSizeScheduler, AdaptiveBatchSampler]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        scheduler = BatchSizeScheduler(
            optimizer,
            copy.deepcopy(self.schedule),
            min_batch_size=self.min_batch_size,
            max_batch_size=self.max_batch_size,
            multiple_of=self.multiple_of,
        )
        sampler = AdaptiveBatchSampler(
            self.dataset_size, scheduler, shuffle=self.shuffle, seed=self.seed, remainder=remainder,
            num_replicas=self.num_replicas, rank=rank,
        )
        return scheduler, sampler


def train(setup: Setup, remainder: str, epochs: int = EPOCHS) -> list[list[list[list[int]]]]:
    """Drive every rank through ``epochs`` epochs in lockstep.

    Returns, per epoch, the list of batches, each a list of the ranks' shares. Checks on the way
    what every policy promises: all ranks yield the same number of batches, of the same size, and
    ``len(sampler)`` announced that number.
    """
    ranks = [setup.build(remainder, rank) for rank in range(setup.num_replicas)]
    record = []
    for epoch in range(epochs):
        for _, sampler in ranks:
            if setup.calls_set_epoch:
                sampler.set_epoch(epoch)
        announced = [len(sampler) for _, sampler in ranks]
        batches = []
        for shares in itertools.zip_longest(*(iter(sampler) for _, sampler in ranks)):
            assert None not in shares, "a rank ran out of batches before the others"
            assert len({len(share) for share in shares}) == 1, f"ranks got different sizes {list(map(len, shares))}"
            for (scheduler, _), share in zip(ranks, shares):
                scheduler.step(len(share))
            batches.append(list(shares))
        assert announced == [len(batches)] * setup.num_replicas, "len(sampler) is not the number of batches yielded"
        samples = sum(len(share) for batch in itertools.chain(*record, batches) for share in batch)
        assert all(scheduler.samples_seen == samples for scheduler, _ in ranks)
        record.append(batches)
    return record


def flat(batch: list[list[int]]) -> list[int]:
    """The global batch: the ranks' shares in rank order."""
    return [index for share in batch for index in share]


# ------------------------------------------------------------------ strategies
@st.composite
def schedules_for(draw, dataset_size: int) -> schedules.Schedule:
    """A built-in schedule with random parameters, in epochs or in samples, that starts anywhere
    from a small fraction of the dataset to beyond it."""
    # From about a hundred batches per epoch (more would only slow the test down) to beyond the dataset.
    start = max(1, round(dataset_size / draw(st.floats(0.5, 100))))
    unit = draw(st.sampled_from(["epoch", "sample"]))
    if unit == "epoch":
        where = st.floats(0.05, EPOCHS, allow_nan=False)
    else:
        where = st.integers(1, EPOCHS * dataset_size).map(float)
    kind = draw(st.sampled_from(["Constant", "Step", "Linear", "Geometric"]))
    if kind == "Constant":
        return schedules.Constant(start)
    if kind == "Step":
        milestones = sorted(set(draw(st.lists(where, max_size=3))))
        return schedules.Step(start=start, factor=draw(st.floats(1.1, 4)), milestones=milestones, unit=unit)
    if kind == "Linear":
        return schedules.Linear(
            start=start, end=start + draw(st.integers(0, 4 * dataset_size)), length=draw(where), unit=unit,
            begin=draw(st.just(0.0) | where),
        )
    end = draw(st.none() | st.integers(start, 8 * dataset_size + start))
    if unit == "sample":
        # At most ~100 intervals in the run: without an end, factor**intervals overflows after ~500
        # (a known limitation, see test_schedules.py).
        where = st.integers(max(1, EPOCHS * dataset_size // 100), EPOCHS * dataset_size).map(float)
    return schedules.Geometric(start=start, factor=draw(st.floats(1.1, 4)), every=draw(where), unit=unit, end=end)


@st.composite
def setups(draw) -> Setup:
    num_replicas = draw(st.integers(1, 4))
    dataset_size = draw(st.integers(num_replicas, 40) | st.integers(41, 3000))
    min_batch_size = draw(st.integers(1, 2) | st.integers(1, min(dataset_size // num_replicas, 40)))
    return Setup(
        dataset_size=dataset_size,
        schedule=draw(schedules_for(dataset_size)),
        num_replicas=num_replicas,
        min_batch_size=min_batch_size,
        max_batch_size=draw(st.none() | st.integers(min_batch_size * num_replicas, 2 * dataset_size)),
        multiple_of=draw(st.sampled_from([1, 1, 2, 3, 4, 8])),
        shuffle=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31)),
        calls_set_epoch=draw(st.booleans()),
    )


def train_or_refuse(setup: Setup, remainder: str):
    """Train, or check that a configuration the rules forbid is refused up front."""
    if not setup.feasible(remainder):
        event("refused")
        with pytest.raises(ValueError):
            setup.build(remainder, rank=0)
        return None
    record = train(setup, remainder)
    event(f"trained, {max(len(batches) for batches in record) // 10 * 10}+ batches per epoch")
    return record


# --------------------------------------------------------------- properties
PROPERTY_SETTINGS = settings(max_examples=300, deadline=None)


@PROPERTY_SETTINGS
@given(setup=setups())
def test_balance(setup):
    record = train_or_refuse(setup, "balance")
    if record is None:
        return
    replicas, floor = setup.num_replicas, setup.min_batch_size
    usable = setup.dataset_size - setup.dataset_size % replicas
    for epoch, batches in enumerate(record):
        # Each index exactly once, in the epoch's order, except the last N % R of the permutation.
        assert [index for batch in batches for index in flat(batch)] == setup.permutation(epoch)[:usable]
        offset = 0
        tail = None  # (offset, size wanted there, batch number) where the last one or two batches begin
        for number, batch in enumerate(batches):
            size, per_replica = len(flat(batch)), len(batch[0])
            assert per_replica >= floor, f"a batch of {per_replica} per replica is below min_batch_size={floor}"
            assert per_replica <= setup.cap_per_replica
            assert setup.max_batch_size is None or size <= setup.max_batch_size
            wanted = setup.target(epoch * setup.dataset_size + offset)
            if tail is None and usable - offset >= 2 * wanted:
                assert size == wanted
                assert per_replica % setup.multiple_of == 0
            else:
                tail = tail or (offset, wanted, number)
            offset += size
        check_balanced_tail(setup, batches[tail[2]:], left=(usable - tail[0]) // replicas, wanted=tail[1] // replicas)
        # What a user of tensor cores relies on: every batch but the last is a multiple of
        # multiple_of per replica, unless the tail sits just above the floor.
        near_floor = len(batches) - tail[2] == 2 and (usable - tail[0]) // replicas < floor + setup.lowest
        assert near_floor or all(len(batch[0]) % setup.multiple_of == 0 for batch in batches[:-1])


def check_balanced_tail(setup: Setup, batches: list[list[list[int]]], left: int, wanted: int) -> None:
    """The documented end of a balanced epoch, per replica, from ``left`` samples when ``wanted``
    are wanted: one batch if ``left <= wanted`` or two would go below the floor; otherwise two, the
    first the multiple of multiple_of nearest half of ``left`` (the larger on a tie) of those that
    keep both within [floor, wanted], or, if there is none, ``ceil(left / 2)``."""
    floor, multiple = setup.min_batch_size, setup.multiple_of
    sizes = [len(batch[0]) for batch in batches]
    assert sum(sizes) == left
    if left <= wanted or left < 2 * floor:
        event("balance: the tail is one batch")
        assert len(sizes) == 1
        return
    assert len(sizes) == 2
    assert all(floor <= size <= wanted for size in sizes)
    fitting = [size for size in range(floor, wanted + 1) if size % multiple == 0 and floor <= left - size <= wanted]
    assert (not fitting) == (left < floor + setup.lowest), "none fits exactly in the documented near-floor case"
    if not fitting:
        event("balance: no multiple of multiple_of fits the two tail batches")
        assert sizes[0] == -(-left // 2)
        return
    event(f"balance: the tail is two batches, {'rounded to multiple_of' if multiple > 1 else 'halves'}")
    assert sizes[0] == min(fitting, key=lambda size: (abs(2 * size - left), -size))
    assert sizes[0] % multiple == 0 and abs(sizes[0] - sizes[1]) <= multiple


@PROPERTY_SETTINGS
@given(setup=setups())
def test_wrap(setup):
    record = train_or_refuse(setup, "wrap")
    if record is None:
        return
    size = setup.dataset_size
    stream = [index for epoch in range(EPOCHS + 1) for index in setup.permutation(epoch)]
    position = 0
    for epoch, batches in enumerate(record):
        for number, batch in enumerate(batches):
            global_batch = flat(batch)
            assert global_batch == stream[position:position + len(global_batch)], "not the next slice of the stream"
            assert len(global_batch) == setup.target(position)
            assert len(batch[0]) % setup.multiple_of == 0
            if number == 0:
                assert position >= epoch * size
            assert position < (epoch + 1) * size, "a batch that starts in the next epoch belongs to it"
            position += len(global_batch)
        assert position >= (epoch + 1) * size, "the end of an epoch was not completed"
    trained = [index for batches in record for batch in batches for index in flat(batch)]
    assert len(trained) == position >= EPOCHS * size
    for start in range(0, len(trained) - size + 1, size):
        assert sorted(trained[start:start + size]) == list(range(size)), "an index missing from one pass"


@PROPERTY_SETTINGS
@given(setup=setups())
def test_drop(setup):
    record = train_or_refuse(setup, "drop")
    if record is None:
        return
    for epoch, batches in enumerate(record):
        # Full batches of the wanted size while they fit; the rest of the epoch is skipped.
        expected_sizes, offset = [], 0
        while setup.dataset_size - offset >= setup.target(epoch * setup.dataset_size + offset):
            expected_sizes.append(setup.target(epoch * setup.dataset_size + offset))
            offset += expected_sizes[-1]
        assert [len(flat(batch)) for batch in batches] == expected_sizes
        assert all(len(batch[0]) % setup.multiple_of == 0 for batch in batches)
        assert [index for batch in batches for index in flat(batch)] == setup.permutation(epoch)[:offset]


@PROPERTY_SETTINGS
@given(setup=setups(), remainder=st.sampled_from(["balance", "wrap", "drop"]))
def test_shares_are_disjoint_and_add_up_to_the_global_batch(setup, remainder):
    record = train_or_refuse(setup, remainder)
    if record is None:
        return
    batches = [batch for epoch in record for batch in epoch]
    for batch in batches:
        shares = [set(share) for share in batch]
        if remainder != "wrap":  # under "wrap" a batch across two epochs may hold an index twice
            assert sum(len(share) for share in shares) == len(set().union(*shares))
        assert len(flat(batch)) % setup.num_replicas == 0
        assert len(flat(batch)) // setup.num_replicas >= setup.min_batch_size


# ----------------------------------------------------------------- examples
def sizes_of(setup: Setup, remainder: str, epochs: int = EPOCHS) -> list[list[int]]:
    return [[len(flat(batch)) for batch in batches] for batches in train(setup, remainder, epochs)]


def test_a_tail_too_small_to_split_above_the_floor_is_shared_evenly():
    setup = Setup(dataset_size=1000, schedule=schedules.Constant(800), min_batch_size=16)
    assert sizes_of(setup, "balance") == [[500, 500]] * EPOCHS


def test_no_ragged_tail_of_104_or_8():
    """1000 samples in batches of 128: drop_last=False leaves 104, balance shares the tail."""
    setup = Setup(dataset_size=1000, schedule=schedules.Constant(128), min_batch_size=16)
    for epoch_sizes in sizes_of(setup, "balance", epochs=5):
        assert epoch_sizes == [128] * 6 + [116, 116]
        assert 104 not in epoch_sizes and 8 not in epoch_sizes


def test_wrap_and_drop_keep_batches_of_128():
    setup = Setup(dataset_size=1000, schedule=schedules.Constant(128))
    # An iteration ends with the batch that crosses into the next epoch: 8 batches, and the next
    # iteration starts 24, 48, ... samples into its epoch.
    assert sizes_of(setup, "wrap") == [[128] * 8] * EPOCHS
    assert sizes_of(setup, "drop") == [[128] * 7] * EPOCHS


@pytest.mark.parametrize(
    "setup, expected",
    [
        # The tail of 232 is 120 + 112, not 116 + 116: tensor cores get multiples of 8.
        (Setup(dataset_size=1000, schedule=schedules.Constant(128), min_batch_size=16, multiple_of=8),
         [128] * 6 + [120, 112]),
        # The last batch holds what is left: 233 = 120 + 113.
        (Setup(dataset_size=1001, schedule=schedules.Constant(128), min_batch_size=16, multiple_of=8),
         [128] * 6 + [120, 113]),
        # Per replica 58 left of 32 wanted: 32 + 26 (24 + 34 would exceed 32).
        (Setup(dataset_size=1003, schedule=schedules.Constant(128), num_replicas=4, min_batch_size=8, multiple_of=8),
         [128] * 6 + [128, 104]),
        # Near the floor: 20 left of 16 wanted, floor 10. 16 + 4 and 8 + 12 break the floor or
        # the size wanted, so the tail is halved as without multiple_of.
        (Setup(dataset_size=100, schedule=schedules.Constant(16), min_batch_size=10, multiple_of=8), [16] * 5 + [10, 10]),
    ],
)
def test_a_balanced_tail_is_cut_at_a_multiple_of_multiple_of(setup, expected):
    assert sizes_of(setup, "balance") == [expected] * EPOCHS


def test_a_tail_below_twice_the_floor_stays_one_batch():
    # 100 = 3 x 30 + 10: splitting the last 40 in two would make batches of 20 < floor 24.
    setup = Setup(dataset_size=100, schedule=schedules.Constant(30), min_batch_size=24, max_batch_size=64)
    assert sizes_of(setup, "balance") == [[30, 30, 40]] * EPOCHS


def test_balance_over_replicas_leaves_out_the_remainder():
    setup = Setup(dataset_size=1003, schedule=schedules.Constant(128), num_replicas=4, min_batch_size=8)
    for epoch, batches in enumerate(train(setup, "balance")):
        assert [len(flat(batch)) for batch in batches] == [128] * 6 + [116, 116]
        left_out = set(range(1003)) - {index for batch in batches for index in flat(batch)}
        assert left_out == set(setup.permutation(epoch)[1000:])


GROWING = Setup(
    dataset_size=1000,
    schedule=schedules.Step(start=50, factor=4, milestones=[300, 1500], unit="sample"),
    num_replicas=2,
    min_batch_size=10,
    max_batch_size=600,
    multiple_of=5,
)


@pytest.mark.parametrize(
    "remainder, expected",
    [
        # 300 left at 700 is under 2 x 200: shared as 150 + 150. At 1600 the size wanted is 800,
        # capped at 600; 400 left are one batch. Epoch 2 wants 600 of 1000: two batches of 500.
        ("balance", [[50] * 6 + [200, 200, 150, 150], [200, 200, 200, 400], [500, 500]]),
        # The batch at 900 takes 100 from epoch 1, which then starts at 1100; 1500 starts a batch of 600.
        ("wrap", [[50] * 6 + [200] * 4, [200, 200, 600], [600, 600]]),
        ("drop", [[50] * 6 + [200] * 3, [200] * 3, [600]]),
    ],
)
def test_growing_mid_epoch(remainder, expected):
    assert sizes_of(GROWING, remainder) == expected


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_dataloader_with_workers_trains_on_the_planned_batches(num_workers):
    """Workers draw batches ahead of training; each epoch still holds the batches a just-in-time run gets."""
    setup = Setup(
        dataset_size=1000,
        schedule=schedules.Step(start=48, factor=2, milestones=[700, 1900], unit="sample"),
        min_batch_size=8,
        seed=7,
    )
    expected = [[flat(batch) for batch in batches] for batches in train(setup, "balance")]
    scheduler, sampler = setup.build("balance", rank=0)
    dataset = torch.utils.data.TensorDataset(torch.arange(setup.dataset_size))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers)
    trained = []
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        batches = []
        for (x,) in loader:
            scheduler.step(len(x))
            batches.append(x.tolist())
        trained.append(batches)
    assert trained == expected


def test_a_run_that_starts_at_a_later_epoch():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = BatchSizeScheduler(optimizer, schedules.Step(start=32, factor=2, milestones=[5]), lr_scaling="linear")
    sampler = AdaptiveBatchSampler(1000, scheduler)
    sampler.set_epoch(10)
    learning_rates = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for batch in sampler:
            optimizer.step()
            scheduler.step(len(batch))
            learning_rates.append(scheduler.get_last_lr()[0])
    assert scheduler.position == 11_000
    assert learning_rates == [pytest.approx(0.2)] * len(learning_rates)  # batch 64 = 2 x the reference 32
