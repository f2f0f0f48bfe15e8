"""The signals measured while training, and the schedule fed with them after each step.

An adaptive schedule (:class:`~adabatch.schedules.Adaptive`) decides from what training shows:
the gradient noise scale (:mod:`adabatch.noise`), measured on the steps
:class:`~adabatch.noise.NoiseSampling` picks, and the seconds a step takes at each batch size
(:class:`~adabatch.throughput.StepTimes`). :class:`StepSignals` owns these measurements, takes
them after each counted step and hands them to :meth:`Schedule.observe
<adabatch.schedules.Schedule.observe>`. The learning-rate rule ``"gain"``
(:class:`~adabatch.lr_scaling.LRFactor`) reads the same noise meter.
"""

from __future__ import annotations

from typing import Callable

import torch

from ._validation import check_fraction
from .constraints import BatchSizeConstraints
from .distributed import RankAgreement
from .noise import DEFAULT_EMA_DECAY, GradientNoiseMeter, NoiseSampling, is_adam_family
from .plan import PlannedBatch
from .schedules import Progress, Schedule
from .throughput import StepTimes

__all__ = ["StepSignals"]


class StepSignals:
    """Measures the gradient noise scale and the step times, and feeds them to the schedule.

    A step of the plain loop is measured by the meter's fallback, which pairs it with the step
    before (:meth:`NoiseSampling.observe_plain_step <adabatch.noise.NoiseSampling.observe_plain_step>`);
    a step of ``train_step`` measures itself, in micro-batches, when :meth:`measures` says so.

    Args:
        optimizer (Optimizer): whose gradients the noise meter reads.
        schedule (Schedule): fed the signals after every step if it :attr:`~Schedule.needs_noise`;
            only then are step times measured.
        constraints (BatchSizeConstraints): the largest batch they allow, which the schedule is told.
        agreement (RankAgreement): the ranks, which time and measure the same steps.
        measure_noise (bool): whether to measure the gradient noise scale.
        noise_decay (float): decay of the noise statistics' moving averages. Default: 0.95.
        noise_interval (int, optional): samples (global) per noise measurement. Default:
            ``max(512, 8 × the global batch size)``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule,
        constraints: BatchSizeConstraints,
        agreement: RankAgreement,
        *,
        measure_noise: bool,
        noise_decay: float = DEFAULT_EMA_DECAY,
        noise_interval: int | None = None,
    ) -> None:
        noise_decay = check_fraction("noise_decay", noise_decay)
        if measure_noise and schedule.needs_noise and noise_decay == 0 and getattr(schedule, "confidence", 0):
            raise ValueError("noise_decay=0 keeps no spread of the noise estimates, so the schedule's confidence "
                             "has no standard error to take off; give noise_decay > 0, or confidence=0")
        self.optimizer = optimizer
        self.schedule = schedule
        self.constraints = constraints
        self.agreement = agreement
        self.noise_meter = GradientNoiseMeter(optimizer, noise_decay) if measure_noise else None
        self.noise_sampling = NoiseSampling(noise_interval)
        # What an adaptive schedule weighs the noise against: the time a step takes at each size.
        self.step_times = StepTimes() if schedule.needs_noise else None
        # For the ranks known now, so that a loop without a sampler is measured from its first
        # step; a sampler that binds the scheduler prepares it again.
        self.prepare()

    def prepare(self) -> None:
        """Set up the plain loop's measurement for the ranks as they are now; called when the
        scheduler is built and when a sampler binds it (see :meth:`NoiseSampling.prepare
        <adabatch.noise.NoiseSampling.prepare>`)."""
        if self.noise_meter is not None:
            self.noise_sampling.prepare(self.noise_meter, self.agreement.distributed)

    def measures(self, start: int, consumed: int) -> bool:
        """Whether the step over the stream's samples ``[start, start + consumed)`` measures
        the noise scale."""
        return self.noise_meter is not None and self.noise_sampling.due(start, consumed)

    def scalars(self) -> dict[str, float]:
        """The noise scale's values for TensorBoard (none if it is not measured)."""
        return {} if self.noise_meter is None else self.noise_meter.noise.scalars()

    def after_step(self, batch: PlannedBatch, consumed: int, local: int, position: int,
                   batch_at: Callable[[int], PlannedBatch], noise_handled: bool = False) -> None:
        """Take the signals of the step that trained ``batch``, and feed them to the schedule.

        Args:
            batch (PlannedBatch): the batch the step trained.
            consumed (int): samples it trained on, over all ranks.
            local (int): samples this rank trained on.
            position (int): the stream position after it.
            batch_at (callable): the batch planned after a stream position
                (:meth:`BatchPlan.batch_at <adabatch.plan.BatchPlan.batch_at>`), read once the
                schedule has decided, to arm the capture for the coming step.
            noise_handled (bool): ``train_step`` saw to the step's noise measurement, so the
                plain loop's fallback is not run. Default: ``False``.
        """
        if self.step_times is not None:
            self.step_times.tick(batch.target, self.agreement.sum if self.agreement.distributed else None)
        meter = self.noise_meter
        if meter is None:
            return
        if not noise_handled:
            self.noise_sampling.observe_plain_step(meter, local, batch.start, consumed)
        if self.schedule.needs_noise:
            progress = Progress(samples=position, dataset_size=self.constraints.dataset_size)
            self.schedule.observe(progress, meter.noise.noise_scale, meter.noise.steps, batch.target,
                                  largest=self.constraints.largest(), step_times=self.step_times,
                                  preconditioned=is_adam_family(self.optimizer), noise=meter.noise)
        self.noise_sampling.arm(batch_at, position, consumed)
