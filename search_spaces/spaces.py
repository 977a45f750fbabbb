"""Named, declarative search spaces (DESIGN.md 6).

A space maps parameter names (the training options, with the paper's names) to a distribution:
`Uniform` (optionally in log space), `Choice`, or `Grid` (every value is run, for ablations). Spaces combine
with "+" in a name (`thresholds+loss_weights`). `validate_space` checks bounds, types, unknown
parameters and conflicts before any trial starts. `to_optuna` and `to_tune` map a space to the
libraries' own distributions; nothing here knows about training or Ray.
"""

from dataclasses import dataclass
from typing import Any

from search_spaces.errors import SpaceError

CAP_FORMS = ("reference", "ipw")  # trainables.losses.CAP_FORMS, named here without importing torch


@dataclass(frozen=True)
class Uniform:
    low: float
    high: float
    log: bool = False  # sample uniformly in log space

    def describe(self) -> str:
        return f"{'log-uniform' if self.log else 'uniform'} [{self.low:g}, {self.high:g}]"


def LogUniform(low: float, high: float) -> Uniform:
    return Uniform(low, high, log=True)


@dataclass(frozen=True)
class Choice:
    values: tuple

    def describe(self) -> str:
        return "one of {" + ", ".join(map(str, self.values)) + "}"


@dataclass(frozen=True)
class Grid:
    """Every value is run (a grid search), e.g. the ablation's variants or seeds."""

    values: tuple

    def describe(self) -> str:
        return "each of {" + ", ".join(map(str, self.values)) + "}"


# The paper's ablation variants, as sets of loss flags.
VARIANTS = {
    "fixmatch": {"cap": False, "cai": False, "cadr": False},
    "cap": {"cap": True, "cai": False, "cadr": False},
    "cai": {"cap": False, "cai": True, "cadr": False},
    "cap_cai": {"cap": True, "cai": True, "cadr": False},
    "cadr": {"cap": True, "cai": True, "cadr": True},
}

# Allowed range and type of every parameter a space may search.
PARAMETERS = {
    "confidence": (float, 0.0, 1.0),
    "cai_beta": (float, 0.0, 10.0),
    "gamma_l": (float, 1.0, float("inf")),
    "gamma_u": (float, 0.0, float("inf")),
    "wu": (float, 0.0, float("inf")),
    "wd": (float, 0.0, 1.0),
    "upper": (float, 0.0, float("inf")),
    "cap_momentum": (float, 0.0, 1.0),
    "lr": (float, 0.0, float("inf")),
    "variant": (str, None, None),
    "seed": (int, 0, float("inf")),
    "cap": (bool, None, None),
    "cai": (bool, None, None),
    "cadr": (bool, None, None),
    "cap_form": (str, None, None),  # reference | ipw
    "cap_ema": (bool, None, None),
}

SPACES: dict[str, dict[str, Any]] = {
    "thresholds": {
        "confidence": Uniform(0.7, 0.99),
        "cai_beta": Uniform(0.0, 1.0),
    },
    "imbalance": {
        "gamma_l": Choice((1, 10, 20, 50, 100, 200)),
    },
    "imbalance_unlabeled": {
        "gamma_l": Choice((1, 10, 20, 50, 100, 200)),
        "gamma_u": Choice((1, 10, 50, 100)),
    },
    "loss_weights": {
        "wu": LogUniform(0.1, 10.0),
        "wd": LogUniform(1e-5, 1e-2),
        "upper": Uniform(1.0, 20.0),
        "cap_momentum": Uniform(0.9, 0.999),
    },
    "ablation": {
        "variant": Grid(tuple(VARIANTS)),
        "seed": Grid((0, 1, 2)),
    },
    "paper": {
        # The paper's fixed settings: FixMatch against CADR at tau 0.95, beta 0.5, upper 5.
        "variant": Grid(("fixmatch", "cadr")),
    },
}

DESCRIPTIONS = {
    "thresholds": "pseudo-label confidence tau and the CAI exponent beta",
    "imbalance": "labeled imbalance ratio gamma_l (each trial gets its own long-tailed split)",
    "imbalance_unlabeled": "labeled and unlabeled imbalance ratios gamma_l, gamma_u",
    "loss_weights": "unlabeled loss weight, weight decay, CAP clip and prior momentum",
    "ablation": "the paper's ablation grid {FixMatch, +CAP, +CAI, +CAP+CAI, CADR} x 3 seeds",
    "paper": "the paper's fixed configurations: FixMatch baseline and CADR at its defaults",
}


def get_space(name: str) -> dict[str, Any]:
    """A named space, or several joined with '+'; a parameter may appear in only one of them."""
    space: dict[str, Any] = {}
    for part in name.split("+"):
        part = part.strip()
        if part not in SPACES:
            raise SpaceError(f"unknown search space '{part}' (known: {', '.join(SPACES)})")
        overlap = set(space) & set(SPACES[part])
        if overlap:
            raise SpaceError(f"spaces in '{name}' both set {', '.join(sorted(overlap))}")
        space.update(SPACES[part])
    return space


def _check_value(name, value):
    kind, low, high = PARAMETERS[name]
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is str:
        ok = isinstance(value, str)
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high
    if name == "variant" and value not in VARIANTS:
        raise SpaceError(f"variant '{value}' is unknown (known: {', '.join(VARIANTS)})")
    if name == "cap_form" and value not in CAP_FORMS:
        raise SpaceError(f"cap_form '{value}' is unknown (known: {', '.join(CAP_FORMS)})")
    if not ok:
        allowed = kind.__name__ if low is None else f"a {kind.__name__} in [{low:g}, {high:g}]"
        raise SpaceError(f"{name}={value!r} is out of range: must be {allowed}")


def validate_space(space: dict[str, Any], fixed: dict[str, Any] | None = None) -> None:
    """Raise SpaceError for an unknown parameter, a bad bound or type, or a conflict.

    `fixed` holds the settings every trial shares (e.g. cap/cai/cadr from the base config), so
    CADR without CAP is caught whether it comes from the space or from the base."""
    fixed = fixed or {}
    for name, dist in space.items():
        if name not in PARAMETERS:
            raise SpaceError(f"unknown parameter '{name}' (searchable: {', '.join(PARAMETERS)})")
        if isinstance(dist, Uniform):
            if not dist.low < dist.high:
                raise SpaceError(f"{name}: lower bound {dist.low:g} is not below upper bound {dist.high:g}")
            if dist.log and dist.low <= 0:
                raise SpaceError(f"{name}: a log-uniform range needs a positive lower bound, got {dist.low:g}")
            _check_value(name, float(dist.low))
            _check_value(name, float(dist.high))
        elif isinstance(dist, (Choice, Grid)):
            if not dist.values:
                raise SpaceError(f"{name}: no values to choose from")
            for value in dist.values:
                _check_value(name, value)
        else:
            raise SpaceError(f"{name}: {dist!r} is not a distribution (Uniform, Choice, Grid)")
    variants = space["variant"].values if "variant" in space else [None]
    for variant in variants:
        flags = {**{k: fixed.get(k, False) for k in ("cap", "cai", "cadr")}, **VARIANTS.get(variant, {})}
        for flag in ("cap", "cadr"):
            if flag in space:
                flags[flag] = True  # a searched flag can be on
        if flags["cadr"] and not flags["cap"]:
            raise SpaceError("CADR without CAP: cadr=True needs cap=True (CADR uses CAP's propensity)")


def space_from_dict(raw: dict) -> dict[str, Any]:
    """A space written in YAML: {param: {uniform: [lo, hi]} | {loguniform: [lo, hi]} |
    {choice: [...]} | {grid: [...]}}."""
    kinds = {"uniform": Uniform, "loguniform": LogUniform, "choice": Choice, "grid": Grid}
    space = {}
    for name, spec in raw.items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in kinds:
            raise SpaceError(f"{name}: write a distribution as one of {', '.join(f'{k}: [...]' for k in kinds)}")
        kind, args = next(iter(spec.items()))
        if not isinstance(args, list):
            raise SpaceError(f"{name}: {kind} takes a list")
        if kind in ("uniform", "loguniform"):
            if len(args) != 2:
                raise SpaceError(f"{name}: {kind} takes [low, high]")
            space[name] = kinds[kind](float(args[0]), float(args[1]))
        else:
            space[name] = kinds[kind](tuple(args))
    return space


def is_grid(space: dict[str, Any]) -> bool:
    return bool(space) and all(isinstance(d, Grid) for d in space.values())


def grid_size(space: dict[str, Any]) -> int:
    size = 1
    for dist in space.values():
        size *= len(dist.values)
    return size


def to_optuna(space: dict[str, Any]) -> dict:
    """Optuna distributions, for OptunaSearch(space=...)."""
    import optuna.distributions as od

    out = {}
    for name, dist in space.items():
        if isinstance(dist, Uniform):
            out[name] = od.FloatDistribution(dist.low, dist.high, log=dist.log)
        else:
            out[name] = od.CategoricalDistribution(list(dist.values))
    return out


def to_tune(space: dict[str, Any]) -> dict:
    """Ray Tune's param_space (grid_search for Grid), for the basic variant generator."""
    from ray import tune

    out = {}
    for name, dist in space.items():
        if isinstance(dist, Uniform):
            out[name] = (tune.loguniform if dist.log else tune.uniform)(dist.low, dist.high)
        elif isinstance(dist, Choice):
            out[name] = tune.choice(list(dist.values))
        else:
            out[name] = tune.grid_search(list(dist.values))
    return out


def describe(name: str) -> str:
    lines = [f"{name}: {DESCRIPTIONS.get(name, '')}"]
    for param, dist in SPACES[name].items():
        lines.append(f"    {param:<14} {dist.describe()}")
    return "\n".join(lines)
