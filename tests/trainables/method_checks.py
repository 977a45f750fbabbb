"""Checks shared by the specifications of the peer methods (test_method_*.py).

The float64 numpy primitives their independent references are written with (softmax,
cross-entropy, central finite differences), random batches of logits, one step of a method on
them, and the checks every method must pass in the same way: a checkpoint round trip continues
exactly, low-precision logits keep their dtype, and workers joined by a threaded collective
reproduce one process. Each method's own formulas and assertions stay in its test file; nothing
here imports the implementation.
"""

import io
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

LOGITS = ("zx", "zw", "zs")  # labeled, weak unlabeled and strong unlabeled logits of a batch
OUTPUTS = ("total", "labeled", "unlabeled", "mask")
LABELED_EXTRAS = ("labeled_strong", "aux_x")  # further logits with a row per labeled row
SHARED_EXTRAS = ("solid",)  # further logits every worker gets whole (one row); the others follow the unlabeled rows


@pytest.fixture(autouse=True, scope="module")
def one_intra_op_thread():
    """The tensors here are tiny: extra CPU threads only add contention. Importing this autouse
    fixture into a test module applies it there."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --- float64 reference primitives -----------------------------------------------------------------

def np_softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_cross_entropy(z, y):
    """Cross-entropy of each row; broadcasts over leading dimensions of z."""
    shifted = z - z.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return -(log_probs * np.eye(z.shape[-1])[y]).sum(axis=-1)


def finite_difference_gradient(f, x, h=1e-6):
    """Central differences of f at x along every coordinate, all in one broadcast call of f."""
    steps = h * np.eye(x.size).reshape(x.size, *x.shape)
    differences = (f(x + steps) - f(x - steps)) / (2 * h)  # 0-d when f does not depend on x
    return np.broadcast_to(differences, (x.size,)).reshape(x.shape)


def gradient_of(leaf: torch.Tensor) -> np.ndarray:
    """The leaf's gradient; zeros where the loss does not depend on it at all."""
    return np.zeros(leaf.shape) if leaf.grad is None else leaf.grad.numpy()


def assert_gradients_match_finite_differences(leaves: dict, reference_total, arrays: dict, names, **tolerance):
    """After a backward, the gradient of each leaf named in `names` matches, within `tolerance`,
    the central finite differences of reference_total(**arrays) in that argument, the others held."""
    for name in names:
        def along(x, name=name):
            return reference_total(**{**arrays, name: x})
        np.testing.assert_allclose(gradient_of(leaves[name]), finite_difference_gradient(along, arrays[name]),
                                   **tolerance, err_msg=name)


# --- batches and steps ----------------------------------------------------------------------------

def random_batches(seed, steps, B, mu, C, scale, weak_shift=0.0, pool=None) -> list[dict]:
    """The batches of one run: B labeled rows (logits zx, labels y) and mu * B unlabeled rows
    (weak logits zw, moved by `weak_shift`, strong logits zs) of C classes, logits normal times
    `scale`; with `pool`, also the unlabeled rows' distinct positions in a pool of that size."""
    rng = np.random.default_rng(seed)

    def batch():
        arrays = dict(zx=scale * rng.standard_normal((B, C)), y=rng.integers(C, size=B),
                      zw=scale * rng.standard_normal((mu * B, C)) + weak_shift,
                      zs=scale * rng.standard_normal((mu * B, C)))
        if pool is not None:
            arrays["index"] = rng.choice(pool, mu * B, replace=False)
        return arrays

    return [batch() for _ in range(steps)]


def with_extras(batches, names, seed, scale) -> list[dict]:
    """The batches with further logits named `names` (a method's `extra_logits`), normal times
    `scale`: a row per labeled row for LABELED_EXTRAS, one row for SHARED_EXTRAS, a row per
    unlabeled row for the others."""
    rng = np.random.default_rng(seed)
    for arrays in batches:
        B, C = arrays["zx"].shape
        for name in names:
            rows = B if name in LABELED_EXTRAS else 1 if name in SHARED_EXTRAS else len(arrays["zw"])
            arrays[name] = scale * rng.standard_normal((rows, C))
    return batches


def confident_balanced_batch(C) -> dict:
    """Two labeled rows and eight unlabeled ones, weak row k near-certain of class k % C:
    balanced classes, every row confident."""
    rng = np.random.default_rng(6)
    zw = np.full((8, C), -10.0)
    zw[np.arange(8), np.arange(8) % C] = 10.0
    return dict(zx=rng.standard_normal((2, C)), y=np.array([1, 2]), zw=zw, zs=rng.standard_normal((8, C)))


def run_step(method, arrays, dtype=torch.float64) -> tuple:
    """One step of `method` on a batch, its logits (and the further logits it asks for) as fresh
    leaves of `dtype` (the positions too where the method needs them): the output and the leaves,
    to read gradients from."""
    names = (*LOGITS, *method.extra_logits())
    leaves = {name: torch.tensor(arrays[name], dtype=dtype, requires_grad=True) for name in names}
    index = torch.tensor(arrays["index"]) if method.needs_index else None
    extras = {name: leaves[name] for name in method.extra_logits()}
    out = method.losses(leaves["zx"], torch.tensor(arrays["y"]), leaves["zw"], leaves["zs"], index, extras)
    return out, leaves


# --- state and checkpoints ------------------------------------------------------------------------

def assert_same_state(method, expected, **tolerance):
    """The two methods hold the same state keys, every value within `tolerance`."""
    assert method.state.keys() == expected.state.keys()
    for key, value in expected.state.items():
        torch.testing.assert_close(method.state[key], value, **tolerance, msg=lambda m, key=key: f"{key}: {m}")


def restored_from_checkpoint(original, fresh):
    """`fresh` after loading the state of `original` through torch.save and a weights-only
    torch.load, as a checkpoint carries it; that state must be tensors only."""
    saved = original.state_dict()
    assert all(isinstance(value, torch.Tensor) for value in saved.values())
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    return fresh


def assert_continues_identically(original, restored, steps):
    """Stepping on, the restored method gives exactly the original's outputs and state."""
    for arrays in steps:
        out, _ = run_step(restored, arrays)
        expected, _ = run_step(original, arrays)
        for name in OUTPUTS:
            torch.testing.assert_close(getattr(out, name), getattr(expected, name), rtol=0, atol=0,
                                       msg=lambda m, name=name: f"{name}: {m}")
        assert_same_state(restored, original, rtol=0, atol=0)


# --- dtypes -----------------------------------------------------------------------------------------

def run_keeping_dtype(method, exact, steps, dtype) -> list[tuple[float, float]]:
    """Steps `method` on logits of `dtype` and `exact` on float64 ones side by side, with a backward
    through `method`'s total, asserting at every step that its outputs and the logits' gradients
    keep `dtype`. Gives each step's pair of totals (method's, exact's)."""
    totals = []
    for arrays in steps:
        out, leaves = run_step(method, arrays, dtype=dtype)
        out.total.backward()
        for name in OUTPUTS:
            assert getattr(out, name).dtype == dtype, name
        assert all(leaf.grad is None or leaf.grad.dtype == dtype for leaf in leaves.values())
        totals.append((out.total.item(), run_step(exact, arrays)[0].total.item()))
    return totals


# --- data parallelism through the collective -----------------------------------------------------

class ThreadedCollective:
    """Workers as threads of one process. `sum` adds all workers' tensors inside one autograd
    graph, so the backward of one worker's loss reaches every worker's inputs: the
    single-process picture of a differentiable all-reduce."""

    def __init__(self, rank: int, slots: list, barrier: threading.Barrier):
        self.rank, self.slots, self.barrier = rank, slots, barrier

    def _all_gather(self, x):
        self.slots[self.rank] = x
        self.barrier.wait()
        parts = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before all have read it
        return parts

    def sum(self, x):
        return torch.stack(self._all_gather(x)).sum(dim=0)

    def gather_rows(self, x):
        parts = self._all_gather(x.detach())
        start = sum(part.shape[0] for part in parts[:self.rank])
        return torch.cat(parts), slice(start, start + x.shape[0])


def threaded_collectives(world_size=2) -> list[ThreadedCollective]:
    """One collective per rank, all joined: one worker's methods for each."""
    slots, barrier = [None] * world_size, threading.Barrier(world_size, timeout=30)
    return [ThreadedCollective(rank, slots, barrier) for rank in range(world_size)]


def losses_on_workers(workers, arrays, leaves, labeled_rows, unlabeled_rows) -> list:
    """Every worker's output on its own rows of one batch (labeled_rows[rank],
    unlabeled_rows[rank]), all stepping at once in threads as their collective needs; slices of
    the shared leaves, so that gradients reach the whole batch."""
    def worker(rank):
        own, own_unlabeled = labeled_rows[rank], unlabeled_rows[rank]
        method = workers[rank]
        index = torch.tensor(arrays["index"])[own_unlabeled] if method.needs_index else None
        extras = {name: leaves[name] if name in SHARED_EXTRAS else
                  leaves[name][own if name in LABELED_EXTRAS else own_unlabeled] for name in method.extra_logits()}
        return method.losses(leaves["zx"][own], torch.tensor(arrays["y"])[own], leaves["zw"][own_unlabeled],
                             leaves["zs"][own_unlabeled], index, extras)

    with ThreadPoolExecutor(max_workers=len(workers)) as pool:
        return list(pool.map(worker, range(len(workers))))


def assert_workers_reproduce_one_process(single, workers, steps, labeled_rows, unlabeled_rows, tolerance: dict,
                                         state_tolerance: dict) -> list[list]:
    """Workers, each on its own rows of every batch (see losses_on_workers), reproduce `single`
    on the whole batches: at every step each worker's losses and the workers' masks side by side
    within `tolerance`, each worker's state within `state_tolerance`, and the gradients that the
    backward of worker 0's total sends to all rows of zx, zs and the further logits within
    `tolerance`. Gives the workers' outputs of each step."""
    outputs = []
    for arrays in steps:
        expected, leaves = run_step(single, arrays)
        outs = losses_on_workers(workers, arrays, leaves, labeled_rows, unlabeled_rows)
        for out in outs:
            for name in ("total", "labeled", "unlabeled"):
                torch.testing.assert_close(getattr(out, name), getattr(expected, name), **tolerance)
        torch.testing.assert_close(torch.cat([out.mask for out in outs]), expected.mask, **tolerance)
        for method in workers:
            assert_same_state(method, single, **state_tolerance)
        inputs = [leaves["zx"], leaves["zs"], *(leaves[name] for name in single.extra_logits())]
        distributed = torch.autograd.grad(outs[0].total, inputs, allow_unused=True)
        local = torch.autograd.grad(expected.total, inputs, allow_unused=True)
        for got, want in zip(distributed, local):
            assert (got is None) == (want is None)
            if want is not None:
                torch.testing.assert_close(got, want, **tolerance)
        outputs.append(outs)
    return outputs


def assert_two_workers_on_halves_reproduce_one_process(make_method, steps, state_tolerance=None) -> tuple[list, list]:
    """Two workers, `make_method(collective)` each, on the halves of every batch (4 labeled rows,
    12 unlabeled ones) reproduce `make_method(None)` on the whole batches (see
    assert_workers_reproduce_one_process), and at some step the halves' masks differ (else a
    per-worker statistic would pass too). Gives the workers and their outputs of each step."""
    workers = [make_method(collective) for collective in threaded_collectives()]
    outputs = assert_workers_reproduce_one_process(
        make_method(None), workers, steps, labeled_rows=[slice(0, 2), slice(2, 4)],
        unlabeled_rows=[slice(0, 6), slice(6, 12)], tolerance=dict(rtol=1e-10, atol=1e-12),
        state_tolerance=state_tolerance or dict(rtol=1e-12, atol=1e-14))
    assert any(outs[0].mask.sum() != outs[1].mask.sum() for outs in outputs)
    return workers, outputs
