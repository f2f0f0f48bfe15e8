"""adabatch: grow the batch size during PyTorch training.

The public API is re-exported here; each name lives in the module of the same concept.
"""

from . import schedules
from .constraints import BatchSizeConstraints, bn_safe_min_batch_size
from .layout import EpochLayout
from .sampler import AdaptiveBatchSampler
from .scheduler import BatchSizeScheduler

__all__ = [
    "AdaptiveBatchSampler",
    "BatchSizeConstraints",
    "BatchSizeScheduler",
    "EpochLayout",
    "bn_safe_min_batch_size",
    "schedules",
]

__version__ = "0.1.0"
