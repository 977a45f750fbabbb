"""A restricted unpickler for dataset archives (CIFAR batches, mini-ImageNet caches).

Pickles from the internet are untrusted: `pickle.load` would run any callable they name. This
unpickler admits only what those formats need: plain containers, strings, bytes, numbers and
numpy arrays. Anything else is refused before it is imported, let alone called.
"""

import importlib
import pickle

from data_prep.errors import DataPrepError

# (module, name) pairs a dataset pickle may reference. numpy 2 moved numpy.core to numpy._core;
# old pickles still name numpy.core, so both spellings map to the same functions.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"): ("numpy._core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"): ("numpy._core.multiarray", "scalar"),
    # Pickle protocol 5 (Python's default) stores arrays as raw buffers read by _frombuffer.
    ("numpy.core.numeric", "_frombuffer"): ("numpy._core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
    # Protocol-2 pickles written by Python 3 encode bytes through _codecs.encode.
    ("_codecs", "encode"): ("_codecs", "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, *, what, encoding):
        super().__init__(file, encoding=encoding)
        self._what = what

    def find_class(self, module, name):
        target = _ALLOWED_GLOBALS.get((module, name))
        if target is None:
            raise DataPrepError(
                f"{self._what}: refusing to unpickle {module}.{name} "
                "(dataset pickles may only hold dicts, lists, strings, bytes and numpy arrays)"
            )
        return getattr(importlib.import_module(target[0]), target[1])


def safe_load(file, *, what, encoding="bytes"):
    """Unpickle `file` (a binary file object) admitting only the dataset formats' types.

    `what` names the source in error messages. Raises DataPrepError for a forbidden type or a
    corrupt stream.
    """
    try:
        return _RestrictedUnpickler(file, what=what, encoding=encoding).load()
    except DataPrepError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, MemoryError) as exc:
        raise DataPrepError(f"{what}: corrupt or truncated pickle ({type(exc).__name__}: {exc})") from None
