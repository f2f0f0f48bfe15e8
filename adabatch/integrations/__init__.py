"""Adapters that carry adabatch into the trainers people already use.

Each adapter lives in its own module and imports its framework only when that module is
imported, so ``import adabatch`` never imports Lightning or transformers:

- :mod:`adabatch.integrations.lightning`: ``AdaptiveBatchSize``, a Lightning ``Callback``
  (``pip install adabatch[lightning]``);
- :mod:`adabatch.integrations.transformers`: ``AdaptiveBatchTrainer``, a drop-in subclass of
  ``transformers.Trainer`` (``pip install adabatch[transformers]``).
"""
