"""FixMatch with the paper's class-aware corrections CAP, CAI and CADR (docs/method.md).

The losses are `trainables.losses.compute_losses`; this entry adds what a method owns: the
options with the paper's names and defaults, and the state `p_ema`, the class distribution of
the unlabeled data (1/C at first), which every step replaces with the step's `p_new`.
"""

import torch

from trainables.errors import TrainConfigError
from trainables.losses import CAP_FORMS, compute_losses
from trainables.methods.base import Method, MethodOutput
from trainables.options import Option

# (cap, cai, cadr) -> the paper's name of the configuration
PAPER_NAMES = {
    (False, False, False): "FixMatch",
    (True, False, False): "FixMatch+CAP",
    (False, True, False): "FixMatch+CAI",
    (True, True, False): "FixMatch+CAP+CAI",
    (True, True, True): "CADR",
}


class FixMatch(Method):
    name = "fixmatch"
    title = "FixMatch"
    options = {
        "cap": Option(False, "CAP: re-weight the labeled loss by the estimated class propensity"),
        "cai": Option(False, "CAI: class-aware pseudo-label thresholds t_c = confidence (p[c] / max p) ** cai_beta"),
        "cadr": Option(False, "CADR: the doubly robust correction of the labeled loss (needs cap)"),
        "confidence": Option(0.95, "pseudo-label threshold tau", low=0, high=1, low_open=True,
                             search={"uniform": [0.7, 0.99]}),
        "cai_beta": Option(0.5, "CAI exponent beta (0: FixMatch's single threshold)", low=0,
                           search={"uniform": [0.0, 1.0]}, needs=("cai", "cadr")),
        "cap_momentum": Option(0.99, "momentum m of the class prior p_ema", low=0, high=1, high_open=True,
                               search={"uniform": [0.9, 0.999]}, needs=("cap", "cai", "cadr")),
        "upper": Option(5.0, "clip of CAP's pseudo-inverse weights W", low=0, low_open=True,
                        search={"uniform": [1.0, 20.0]}, needs=("cap",)),
        "cap_ema": Option(True, "CAP's propensity from p_ema and the pseudo-inverse (false: the batch mean)"),
        "cap_form": Option("reference", "how the CAP weight enters the labeled loss: reference (CE - log w) or "
                           "ipw (w * CE)", choices=tuple(CAP_FORMS)),
    }

    @classmethod
    def check(cls, options: dict) -> None:
        if options["cadr"] and not options["cap"]:
            raise TrainConfigError("cadr=True requires cap=True: CADR re-weights with the CAP propensity")

    @classmethod
    def label(cls, options: dict) -> str:
        flags = tuple(bool(options.get(name, False)) for name in ("cap", "cai", "cadr"))
        return PAPER_NAMES.get(flags, "FixMatch+" + "+".join(n.upper() for n, on in zip(("cap", "cai", "cadr"), flags)
                                                               if on))

    def initial_state(self):
        return {"p_ema": torch.full((self.num_classes,), 1.0 / self.num_classes)}

    def step_losses(self, logits_x, labels, logits_weak, logits_strong, unlabeled_index) -> MethodOutput:
        out = compute_losses(logits_x, labels, logits_weak, logits_strong, self.state["p_ema"],
                             collective=self.collective, **self.config)
        self.state["p_ema"] = out.p_new.detach()
        return MethodOutput(total=out.total, labeled=out.labeled, unlabeled=out.unlabeled, mask=out.mask,
                            stats={"loss/cadr": out.cadr.detach()})
