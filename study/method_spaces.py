"""Each method's own search space, read from its declarations in the registry (the `search`
range of each option, trainables/options.py): a new method is tunable with no edit here.

A variant (search_spaces.VARIANTS: a method and its flags, e.g. cadr) searches the options of
its method that have a range and matter to it (an option that `needs` flags the variant leaves
off, such as cai_beta for plain FixMatch, is left alone), plus the common `wu` and `lr`. An option
searched as a complement (a momentum near 1, on a log scale) is the space parameter `1-<name>`:
`1-ema_m: 0.001` trains with ema_m = 0.999.
"""

from search_spaces import VARIANTS
from search_spaces.spaces import space_from_dict
from study.errors import StudyError
from trainables.config import TrainConfig
from trainables.methods import METHODS, get_method
from trainables.options import Option

COMPLEMENT = "1-"
SHARED = ("lr",)  # training fields every method searches (besides the methods' common options)
PREFIX = "method:"  # a named space "method:<variant>"


def variant_settings(variant: str) -> dict:
    """The method and options a variant (or a plain method name) trains with."""
    if variant in VARIANTS:
        return dict(VARIANTS[variant])
    if variant in METHODS:
        return {"method": variant}
    raise StudyError(f"unknown method or variant '{variant}' (known: {', '.join(sorted({*VARIANTS, *METHODS}))})")


def searched_options(variant: str) -> dict[str, Option]:
    """The declared options a variant searches, by name."""
    settings = variant_settings(variant)
    method = get_method(settings["method"])
    declared = {**{name: TrainConfig.options()[name] for name in SHARED}, **method.all_options()}
    flags = {name: settings.get(name, option.default) for name, option in declared.items() if option.kind is bool}
    return {name: option for name, option in declared.items()
            if option.search and (not option.needs or any(flags.get(flag) for flag in option.needs))}


def parameter(name: str, option: Option) -> str:
    return COMPLEMENT + name if option.search.get("complement") else name


def method_space(variant: str) -> dict:
    """The variant's space as distributions (search_spaces/)."""
    raw = {}
    for name, option in searched_options(variant).items():
        kind, = (key for key in option.search if key != "complement")
        raw[parameter(name, option)] = {kind: list(option.search[kind])}
    return space_from_dict(raw)


def reference_point(variant: str) -> dict:
    """The variant's reference defaults as a point of its space."""
    return {parameter(name, option): (round(1 - option.default, 12) if option.search.get("complement")
                                      else option.default)
            for name, option in searched_options(variant).items()}


def training_values(params: dict) -> dict:
    """Space parameters -> training values: `1-<name>: x` becomes `<name>: 1 - x`."""
    return {(key.removeprefix(COMPLEMENT) if key.startswith(COMPLEMENT) else key):
            (round(1 - value, 12) if key.startswith(COMPLEMENT) else value) for key, value in params.items()}


def named_space(name: str) -> dict | None:
    """The space "method:<variant>", or None for a name that is not one."""
    return method_space(name.removeprefix(PREFIX)) if name.startswith(PREFIX) else None
