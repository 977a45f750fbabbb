"""Named, reusable search spaces for studies: thresholds, imbalance ratios, loss weights, ablations."""

from search_spaces.errors import SpaceError
from search_spaces.spaces import SPACES, VARIANTS, get_space, validate_space

__all__ = ["SPACES", "SpaceError", "VARIANTS", "get_space", "validate_space"]
