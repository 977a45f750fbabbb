"""Named, declarative search spaces.

A space maps parameter names (the training options and the methods' options, with the paper's
names) to a distribution: `Uniform` (optionally in log space), `Choice`, or `Grid` (every value
is run, for ablations). Spaces combine with "+" in a name (`thresholds+loss_weights`).
`validate_space` checks the distributions themselves (bounds, empty choices, variant names);
whether a parameter exists and which values training accepts is the study layer's check, against
the training config and the methods registry, so nothing here knows about training or Ray.
`to_optuna` and `to_tune` map a space to the libraries' own distributions.
"""

from dataclasses import dataclass
from typing import Any

from search_spaces.errors import SpaceError


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


# Named configurations a space can run as one parameter (`variant`): a method and its options.
# The paper's ablation of FixMatch's corrections first, then the peer methods at their
# reference defaults.
VARIANTS = {
    "fixmatch": {"method": "fixmatch", "cap": False, "cai": False, "cadr": False},
    "cap": {"method": "fixmatch", "cap": True, "cai": False, "cadr": False},
    "cai": {"method": "fixmatch", "cap": False, "cai": True, "cadr": False},
    "cap_cai": {"method": "fixmatch", "cap": True, "cai": True, "cadr": False},
    "cadr": {"method": "fixmatch", "cap": True, "cai": True, "cadr": True},
    "flexmatch": {"method": "flexmatch"},
    "freematch": {"method": "freematch"},
    "softmatch": {"method": "softmatch"},
    "debiaspl": {"method": "debiaspl"},
    "simpro": {"method": "simpro"},
    "cdmad": {"method": "cdmad"},
    "acr": {"method": "acr"},
}
ABLATION = ("fixmatch", "cap", "cai", "cap_cai", "cadr")
BASELINES = ("fixmatch", "cadr", "flexmatch", "freematch", "softmatch", "debiaspl", "simpro", "cdmad",
             "acr")

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
        "variant": Grid(ABLATION),
        "seed": Grid((0, 1, 2)),
    },
    "baselines": {
        "variant": Grid(BASELINES),
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
    "baselines": "CADR against the peer methods {FixMatch, CADR, FlexMatch, FreeMatch, SoftMatch, DebiasPL, "
                 "SimPro, CDMAD, ACR} x 3 seeds",
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


def validate_space(space: dict[str, Any]) -> None:
    """Raise SpaceError for a distribution that cannot be sampled: reversed or non-numeric bounds,
    a log range that reaches 0, no values to choose from, or an unknown variant."""
    for name, dist in space.items():
        if isinstance(dist, Uniform):
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (dist.low, dist.high)):
                raise SpaceError(f"{name}: a range needs numeric bounds, got [{dist.low!r}, {dist.high!r}]")
            if not dist.low < dist.high:
                raise SpaceError(f"{name}: lower bound {dist.low:g} is not below upper bound {dist.high:g}")
            if dist.log and dist.low <= 0:
                raise SpaceError(f"{name}: a log-uniform range needs a positive lower bound, got {dist.low:g}")
        elif isinstance(dist, (Choice, Grid)):
            if not dist.values:
                raise SpaceError(f"{name}: no values to choose from")
        else:
            raise SpaceError(f"{name}: {dist!r} is not a distribution (Uniform, Choice, Grid)")
    for variant in space["variant"].values if isinstance(space.get("variant"), (Choice, Grid)) else ():
        if variant not in VARIANTS:
            raise SpaceError(f"variant '{variant}' is unknown (known: {', '.join(VARIANTS)})")


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
