"""The gradient noise scale, measured for free from gradients training computes anyway.

McCandlish et al. (2018), "An Empirical Model of Large-Batch Training", show that the batch size
beyond which larger batches stop paying off tracks the simple noise scale
``B_simple = tr(Σ) / |G|²``: the per-sample gradient variance over the squared norm of the true
gradient. Their Appendix A.1 estimates both without per-sample gradients, from the squared norms
of two mean gradients over batches of ``B_small < B_big`` samples of the same step:

    |G|²  ≈ (B_big·|G_big|² − B_small·|G_small|²) / (B_big − B_small)
    tr(Σ) ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)

Each estimate is unbiased but very noisy (single steps swing by orders of magnitude), so each
is smoothed with its own bias-corrected exponential moving average, and ``B_simple`` is the ratio
of the averages, never an average of ratios. The spread of the raw estimates gives each average
its standard error (:attr:`NoiseScale.standard_errors`): where ``|G|²``'s is as large as half of
it, ``B_simple`` is not resolved.

Where the two batches come from:

* ``BatchSizeScheduler.train_step`` (one device): ``B_small`` is the first micro-batch, read
  from the gradient after its backward and before the rest is accumulated; ``B_big`` is the
  whole batch. No extra forward or backward pass. A batch that fits in one micro-batch is
  split in two for the measurement, when each half keeps to ``min_batch_size``; one below twice
  that floor is measured by the plain loop's fallback.
* The plain loop (``loss.backward(); optimizer.step(); scheduler.step(len(x))``): the fallback
  pairs the gradient of this step with the previous step's, two independent batches: ``|G|²`` is
  their product, ``tr(Σ)`` their squared difference over ``1/B + 1/B_previous``. That is the
  two-batch estimate with the small batch either step and the big one both, averaged over the
  two choices, which halves the variance of ``|G|²``'s estimate (a single choice adds the
  difference of the steps' squared norms, a term of mean zero). The parameters moved between
  the two steps, so the pair is not two batches at one point: the difference between the
  steps' true gradients counts as noise, and ``tr(Σ)`` (hence ``B_simple``) is overestimated,
  by an amount that grows with the learning rate and the curvature. It costs one copy of the
  gradients, which a checkpoint taken between the two steps keeps, so a resumed run measures
  the same steps; under Adam both gradients are preconditioned once, when the pair is
  measured. A loop that clips the gradient (or rescales it otherwise as a whole) before
  ``optimizer.step()`` is measured on the gradients backward computed
  (:class:`~adabatch.noise.backward_capture.BackwardCapture`), on one process.
* Under torch.distributed the per-rank gradient before the all-reduce is ``B_small`` and the
  all-reduced one ``B_big`` (McCandlish et al.: the data-parallel case is free).
* Under FSDP2 (``fully_shard``) ``train_step`` measures as on one device over the global batch:
  ``B_small`` is the first micro-batches of all the ranks, reduce-scattered, ``B_big`` the global
  batch; a measured step is trained in two halves. The gradients (and Adam's second moments) are
  read as each rank's local slices and the statistics summed over the ranks
  (:func:`adabatch.fsdp.shard_sum`), so they are those of the whole gradients; the plain loop's
  fallback then measures what it measures under DDP.

The scheduler measures the steps that reach a multiple of ``noise_interval`` samples, the same
steps on every rank and after a resume (:class:`NoiseSampling`). A measurement costs about the
same at any batch size (a small batch trained in two halves takes much longer than in one), so
by default one step per 512 samples is measured, and at most one step in eight: the interval is
``max(512, 8 × batch size)``. Each measurement of a larger batch is the more
precise (the noise in the estimate of ``|G|²`` falls as ``1/B``). The moving averages count
measurements, so at large batches they span more samples: at batch 1,024, the default decay's
twenty-odd measurements are about 160,000 samples.

For Adam-family optimizers the gradients are preconditioned first (divided elementwise by
``√v̂ + eps``, Adam's own second-moment estimate), which measures the noise in the update the
optimizer actually takes.
"""

from .meter import GradientNoiseMeter, is_adam_family, preconditioner
from .sampling import DEFAULT_NOISE_INTERVAL, MIN_STEPS_PER_MEASUREMENT, NoiseSampling
from .scale import DEFAULT_EMA_DECAY, BiasCorrectedEMA, NoiseScale

__all__ = [
    "DEFAULT_EMA_DECAY",
    "DEFAULT_NOISE_INTERVAL",
    "MIN_STEPS_PER_MEASUREMENT",
    "BiasCorrectedEMA",
    "GradientNoiseMeter",
    "NoiseSampling",
    "NoiseScale",
    "is_adam_family",
    "preconditioner",
]
