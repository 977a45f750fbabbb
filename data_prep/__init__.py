"""Raw dataset readers -> Parquet, MNAR split generation, and loading for training."""

from data_prep.errors import DataPrepError

__all__ = ["DataPrepError"]
