"""Models, batched augmentation, FixMatch + CAP/CAI/CADR losses and the training loop."""

from trainables.errors import TrainConfigError

__all__ = ["TrainConfigError"]
