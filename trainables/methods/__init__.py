"""Semi-supervised methods as a registry (docs/method.md, "Methods").

    from trainables.methods import create_method
    method = create_method("fixmatch", num_classes=C, num_unlabeled=N, cap=True, cai=True, cadr=True)
    out = method.losses(logits_x, labels, logits_weak, logits_strong, unlabeled_index)

Adding a method is one file with a `Method` subclass, registered in `METHODS` below.
"""

from trainables.errors import TrainConfigError
from trainables.methods.acr import ACR
from trainables.methods.base import COMMON_OPTIONS, Method, MethodOutput
from trainables.methods.cdmad import CDMAD
from trainables.methods.debiaspl import DebiasPL
from trainables.methods.fixmatch import FixMatch
from trainables.methods.flexmatch import FlexMatch
from trainables.methods.freematch import FreeMatch
from trainables.methods.simpro import SimPro
from trainables.methods.softmatch import SoftMatch
from trainables.options import Option

METHODS: dict[str, type[Method]] = {
    method.name: method for method in (FixMatch, FlexMatch, FreeMatch, SoftMatch, DebiasPL, SimPro, CDMAD, ACR)
}


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise TrainConfigError(f"method must be one of {', '.join(sorted(METHODS))}, got {name!r}")
    return METHODS[name]


def create_method(name: str, num_classes: int, num_unlabeled: int = 0, collective=None, labeled_counts=None,
                  labeled_in_pool=None, **options) -> Method:
    """The method registered under `name`, with its options validated (wu among them);
    `labeled_counts` (the labeled rows per class) for a method that needs them, `labeled_in_pool`
    (which unlabeled rows are labeled too) for one that tells them apart."""
    return get_method(name)(num_classes, num_unlabeled, collective, labeled_counts, labeled_in_pool=labeled_in_pool,
                            **options)


def option_names() -> set[str]:
    """Every option of every method (what a flat training config may hold besides its own fields)."""
    return {name for method in METHODS.values() for name in method.all_options()}


__all__ = ["COMMON_OPTIONS", "METHODS", "Method", "MethodOutput", "Option", "create_method", "get_method",
           "option_names"]
