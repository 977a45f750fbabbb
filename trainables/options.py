"""Options declared once: name, type, default, bounds or choices, and a help line.

Every setting of every layer is an `Option`: the training config (trainables/config.py), the
resources (trainables/resources.py), each method's options (trainables/methods/), and each
section of a study config (study/config.py). Whatever reads a setting reads its declaration:

- validation: a frozen `Declared` dataclass checks each field when it is built (and nowhere
  else): `lr must be > 0, got 0`, with the error type of its package;
- YAML and dicts: `from_dict` refuses unknown keys, naming the known ones, and builds sections;
- command lines: `add_argument` turns an option into an argparse flag with its type, choices
  and help (bool options become --flag / --no-flag);
- search spaces: an option's `search` range is where a study tunes it (each method's own space
  comes from its declarations), and the study checks a space's values with the same declarations.

A new setting is one line: `steps: int = option(1000, "training steps", low=1)`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from data_prep.names import PLAIN_NAME, is_plain_name

OPTION = "option"  # the key of a field's Option in its dataclass metadata
SECTION = "section"  # the key of a nested Declared class (a section of a config)


@dataclass(frozen=True)
class Option:
    """One setting: its default, what it allows (said as `allowed`), and a help line.

    The type is the default's, or `kind` where the default is None (an optional setting, None
    meaning "not set": sized, derived or looked up later)."""

    default: Any
    help: str
    low: float | None = None  # numeric bounds; *_open excludes the bound itself
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    # A dict: a registry, whose keys are allowed as it is when a value is checked (not hashed: a
    # registry is mutable).
    choices: tuple | dict | None = dataclasses.field(default=None, hash=False)
    kind: type | None = None  # the type, where the default (None) does not say it
    # Where a study searches this option (study/method_spaces.py turns it into a space): plain data
    # as a study file writes a range, {"uniform": [lo, hi]}, {"loguniform": [lo, hi]} or
    # {"choice": [...]}, with "complement": true to search 1 - value instead (a momentum near 1
    # on a log scale). None: not searched.
    search: dict | None = None
    # The bool options of which at least one must be on for this option to matter (cai_beta needs
    # cai or cadr); a search leaves it alone otherwise.
    needs: tuple = ()
    path_name: bool = False  # a name that becomes a path under a root: plain only (data_prep/names.py)

    def __post_init__(self):
        if self.kind is None:
            object.__setattr__(self, "kind", type(self.default))

    @property
    def optional(self) -> bool:
        return self.default is None

    @property
    def choice_list(self) -> list:
        """The allowed values now (a registry's sorted names)."""
        return sorted(self.choices) if isinstance(self.choices, dict) else list(self.choices or ())

    @property
    def allowed(self) -> str:
        if self.kind is bool:
            return "true or false"
        if self.path_name:
            return PLAIN_NAME
        if self.choices is not None:
            return f"one of {', '.join(map(str, self.choice_list))}"
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        if self.kind in (int, float):
            return f"a finite {self.kind.__name__}"
        return "a value" if self.kind is object else f"a {self.kind.__name__}"

    def accepts(self, value) -> bool:
        if value is None:
            return self.optional
        if self.kind is bool:
            return isinstance(value, bool)
        if self.path_name:
            return is_plain_name(value)
        if self.kind is str:
            return isinstance(value, str) and (self.choices is None or value in self.choices)
        if self.kind not in (int, float):
            return isinstance(value, self.kind)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.kind is int and not float(value).is_integer():
            return False
        if self.choices is not None and value not in self.choices:
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def check(self, name: str, value, error: type[Exception] = ValueError):
        """`value` if this option accepts it (an int given for a float option becomes a float),
        else `error` naming the setting and what it allows."""
        if isinstance(value, float) and not math.isfinite(value) and self.kind in (int, float):
            raise error(f"{name} must be a finite number, got {value!r}")
        if not self.accepts(value):
            raise error(f"{name} must be {self.allowed}, got {value!r}")
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if self.kind is int and isinstance(value, float):
            return int(value)
        return value

    def describe(self) -> str:
        """The help line with the default and what is allowed, for --help and listings (the
        default only where the help does not already say what an unset value means)."""
        default = "not set" if self.default is None else self.default
        parts = [] if "(default:" in self.help else [f"default: {default}"]
        if self.allowed not in ("a str", "a value"):  # free-form: the help says what it may be
            parts.append(self.allowed)
        return f"{self.help} ({'; '.join(parts)})" if parts else self.help


def option(default, help: str, **declared) -> dataclasses.Field:
    """A dataclass field declared by its `Option` (see `Option` for the keywords)."""
    declaration = Option(default, help, **declared)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata={OPTION: declaration})
    return dataclasses.field(default=default, metadata={OPTION: declaration})


def section(cls: type[Declared]) -> dataclasses.Field:
    """A dataclass field holding a nested section, itself a `Declared` class."""
    return dataclasses.field(default_factory=cls, metadata={SECTION: cls})


class Declared:
    """The base of a frozen dataclass whose fields are `option(...)`s and `section(...)`s.

    Built, it has checked every field against its declaration (then `check` runs the rules
    between fields); after that it is trusted as it is. `where` prefixes the names in messages
    (a study's "search." section), `error` is the package's exception for a user error."""

    where: ClassVar[str] = ""
    error: ClassVar[type[Exception]] = ValueError
    noun: ClassVar[str] = ""  # what a top-level config is called in messages ("study")

    def __post_init__(self):
        for name, declaration in self.options().items():
            value = declaration.check(self.where + name, getattr(self, name), self.error)
            object.__setattr__(self, name, value)
        self.check()

    def check(self) -> None:
        """Rules between fields (raise `self.error`); the fields themselves are already checked."""

    @classmethod
    def options(cls) -> dict[str, Option]:
        return {f.name: f.metadata[OPTION] for f in fields(cls) if OPTION in f.metadata}

    @classmethod
    def sections(cls) -> dict[str, type[Declared]]:
        return {f.name: f.metadata[SECTION] for f in fields(cls) if SECTION in f.metadata}

    @classmethod
    def from_dict(cls, raw) -> Declared:
        """Build from a mapping (a YAML section): unknown keys are refused, naming the known ones;
        sections are built from their own mappings."""
        label = cls.where.rstrip(".")
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise cls.error(f"'{label}' must be a mapping" if label else "a config must be a mapping")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(raw) - set(known))
        if unknown:
            what = f"key(s) in '{label}'" if label else f"{cls.noun or 'config'} key(s)"
            raise cls.error(f"unknown {what}: {', '.join(map(str, unknown))} (known: {', '.join(known)})")
        values = dict(raw)
        for name, section_class in cls.sections().items():
            if name in values and not isinstance(values[name], section_class):
                values[name] = section_class.from_dict(values[name])
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> Declared:
        """A copy with `changes`: the changed fields are checked (and the rules between fields);
        the others were checked when this one was built."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field(s) {', '.join(unknown)}")
        declared = self.options()
        changed = copy.copy(self)
        for name, value in changes.items():
            if name in declared:
                value = declared[name].check(self.where + name, value, self.error)
            object.__setattr__(changed, name, value)
        changed.check()
        return changed


def add_argument(parser, flag: str, declaration: Option, *, dest: str | None = None, default=argparse.SUPPRESS,
                 help: str | None = None) -> None:
    """An argparse flag for a declared option, with its type and help (bool options take --flag /
    --no-flag). The value is checked where the config is built, by the same declaration, so a bad
    one reads the same from the command line as from a file. With the default SUPPRESS an absent
    flag leaves the setting alone."""
    kwargs = {"dest": dest} if dest else {}
    text = help or (declaration.describe() if default is argparse.SUPPRESS
                    else f"{declaration.help} (default: {default})")
    if declaration.kind is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text, **kwargs)
        return
    kind = declaration.kind if declaration.kind in (int, float) else str  # anything else is named on a CLI
    choices = declaration.choice_list
    metavar = ("{" + ",".join(map(str, choices)) + "}" if choices and len(choices) <= 6
               else flag.lstrip("-").replace("-", "_").upper())
    parser.add_argument(flag, type=kind, default=default, help=text, metavar=metavar, **kwargs)


def flag(name: str) -> str:
    """The command-line flag of a setting: num_workers -> --num-workers."""
    return f"--{name.replace('_', '-')}"
