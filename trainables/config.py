"""The training configuration: every field declared once (trainables/options.py), typed, frozen.

`TrainConfig.from_dict` takes a flat mapping (a YAML `train:` section, a command line): `method`
names a registered method (trainables/methods) and the method's own options (the paper's `cap`,
`cai`, `confidence`, ...) go into one `MethodConfig`. Everything is checked once, when the config
is built, with a message naming the field and what it allows; then it travels as it is, frozen.
"""

from dataclasses import dataclass, field, fields

from trainables.augment import DEFAULT_AUGMENT, describe_parts, parse_augment
from trainables.errors import TrainConfigError
from trainables.methods import COMMON_OPTIONS, get_method, option_names
from trainables.models import MODELS
from trainables.options import Declared, option

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class MethodConfig:
    """A registered method and all its options (defaults filled in), checked by the method."""

    name: str = "fixmatch"
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "options", get_method(self.name).validate(dict(self.options)))

    @property
    def label(self) -> str:
        """How reports name this configuration (e.g. "CADR", "FlexMatch")."""
        return get_method(self.name).label(self.options)


@dataclass(frozen=True)
class TrainConfig(Declared):
    error = TrainConfigError

    # data
    dataset: str = option("digits", "a converted dataset (python -m data_prep list)", path_name=True)
    split: str = option("digits_LT_10.1@50", "an MNAR split of it: a file in its splits/ or an original-style "
                        "name such as digits_LT_10.1@50-100", path_name=True)
    data_root: str | None = option(None, "where datasets live (default: $ML_DATA or ./data)", kind=str)
    # model and augmentation
    model: str = option("cnn_small", "the network", choices=MODELS)  # the registry: as it is when checked
    augment: str = option(DEFAULT_AUGMENT, "augmentation of the labeled, weak and strong branches, L.W.S, each part "
                          f"one of {describe_parts()}; a strong d means cta")
    flip: bool | None = option(None, "random horizontal flips (default: off for single-channel data such as "
                               "digits, on otherwise)", kind=bool)
    channels_last: bool = option(True, "channels-last memory format (faster convolutions on most hardware)")
    compile: bool = option(False, "torch.compile the model")
    precision: str = option("fp32", "fp32, or bf16 / fp16 autocast of the model's forward (fp16 with a gradient "
                            "scaler); losses, class priors, EMA weights, optimizer state and checkpoints stay fp32",
                            choices=PRECISIONS)
    # optimisation
    steps: int = option(1000, "training steps", low=1)
    batch_size: int = option(64, "B labeled images per step, global: split across the workers", low=1)
    mu: int = option(7, "unlabeled images per labeled image (mu*B per step)", low=1)
    lr: float = option(0.03, "learning rate, with FixMatch's cosine schedule lr * cos(7 pi k / (16 K))",
                       low=0, low_open=True, search={"loguniform": [0.01, 0.1]})
    momentum: float = option(0.9, "SGD (Nesterov) momentum", low=0, high=1, high_open=True)
    wd: float = option(5e-4, "weight decay on convolution and linear weights", low=0)
    ema_decay: float = option(0.999, "decay of the EMA weights (the evaluated model)", low=0, high=1, high_open=True)
    # evaluation and bookkeeping
    eval_every: int = option(100, "steps between evaluations (and checkpoints)", low=1)
    eval_batch_size: int = option(1024, "images per evaluation batch", low=1)
    seed: int = option(0, "seed of the model, sampling and augmentation")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    method: MethodConfig = field(default_factory=MethodConfig)

    def check(self):
        parse_augment(self.augment)
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise TrainConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    @classmethod
    def from_dict(cls, values) -> "TrainConfig":
        """Build from a flat mapping: `method` (default fixmatch) and its options (cap, confidence,
        ...) go into `method`, every other key is a TrainConfig field."""
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise TrainConfigError("a training config must be a mapping")
        fields_, options = cls._split(values)
        return cls(method=MethodConfig(values.get("method", "fixmatch"), options), **fields_)

    def with_values(self, values: dict) -> "TrainConfig":
        """This config with some fields and method options (flat, as in `from_dict`) changed, all
        checked once. Another `method` starts from that method's defaults: only the options every
        method shares (wu) carry over, the others belong to this config's method."""
        fields_, options = self._split(values)
        name = values.get("method", self.method.name)
        kept = self.method.options if name == self.method.name else \
            {k: v for k, v in self.method.options.items() if k in COMMON_OPTIONS}
        return self.replace(method=MethodConfig(name, {**kept, **options}), **fields_)

    @classmethod
    def _split(cls, values: dict) -> tuple[dict, dict]:
        """A flat mapping -> (training fields, method options); unknown keys refused."""
        if "strong_augment" in values:
            raise TrainConfigError("strong_augment was replaced by augment (L.W.S): strong_augment: randaugment is "
                                   "augment: d.d.rac, ctaugment is augment: d.d.cta")
        train_keys, method_keys = cls.field_names(), option_names()
        unknown = set(values) - train_keys - method_keys - {"method"}
        if unknown:
            raise TrainConfigError(f"unknown training option(s): {', '.join(sorted(map(str, unknown)))}")
        return ({k: v for k, v in values.items() if k in train_keys},
                {k: v for k, v in values.items() if k in method_keys})

    @classmethod
    def field_names(cls) -> set[str]:
        """The training fields a flat mapping may set besides `method` and its options."""
        return {f.name for f in fields(cls)} - {"method"}

    def to_dict(self) -> dict:
        """Flat dict, the inverse of from_dict."""
        flat = {name: getattr(self, name) for name in self.options()}
        return {**flat, "method": self.method.name, **self.method.options}
