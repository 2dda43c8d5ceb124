"""mtt_lab: dataset distillation by matching training trajectories, as a course you can run.

Modules, in the order data flows through them: ``data`` (datasets as tensors) -> ``models``
(networks, flat-parameter view) -> ``augment`` (DSA) -> ``train`` (the training loop) ->
``experts`` (trajectories) -> ``distill`` (MTT) -> ``evaluate`` -> ``images`` / ``viz`` / ``widgets``.
"""

__version__ = "0.1.0"
