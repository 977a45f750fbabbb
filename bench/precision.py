"""Mixed precision against fp32: the same digits training in each precision, same seed.

    python bench/precision.py --steps 300 --precisions fp32 bf16

Trains FixMatch+CAP+CAI+CADR on digits (cnn_small, B=32, mu=3) once per precision with
`trainables.loop.train`, and prints each run's loss and test accuracy at every evaluation, its
largest relative loss gap and final accuracy gap to the first precision given, and its time as a
ratio to the first. The last line is JSON. On a CPU without fp16 kernels, fp16 is many times
slower than fp32 (bf16 is the CPU's half precision); on a GPU pass `--device cuda`.
"""

import argparse
import json
import tempfile
import time

from data_prep.convert import prepare
from trainables.config import TrainConfig
from trainables.loop import train


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-root", default=None, help="where digits is (prepared there if missing)")
    args = parser.parse_args(argv)

    root = args.data_root or tempfile.mkdtemp(prefix="bench-precision-")
    prepare("digits", root)
    runs = {}
    for precision in args.precisions:
        config = TrainConfig.from_dict({
            "dataset": "digits", "split": "digits_LT_10.1@50-100", "data_root": root, "model": "cnn_small",
            "steps": args.steps, "eval_every": args.eval_every, "batch_size": 32, "mu": 3,
            "cap": True, "cai": True, "cadr": True, "precision": precision, "device": args.device})
        start = time.perf_counter()
        history = train(config, progress=False)["history"]
        runs[precision] = {"seconds": time.perf_counter() - start,
                           "loss": [m["loss/total"] for m in history],
                           "test_accuracy": [m["test_accuracy"] for m in history]}
        print(f"{precision}: {runs[precision]['seconds']:.1f} s")
        for m in history:
            print(f"  step {m['step']:>5}  loss {m['loss/total']:.4f}  test accuracy {m['test_accuracy']:.4f}")

    base_name = args.precisions[0]
    base = runs[base_name]
    summary = {"device": args.device, "steps": args.steps, "baseline": base_name, "runs": {}}
    for precision, run in runs.items():
        loss_gap = max(abs(a - b) / abs(b) for a, b in zip(run["loss"], base["loss"]))
        accuracy_gap = run["test_accuracy"][-1] - base["test_accuracy"][-1]
        summary["runs"][precision] = {"time_ratio": run["seconds"] / base["seconds"],
                                      "max_relative_loss_gap": loss_gap, "final_accuracy_gap": accuracy_gap,
                                      "final_test_accuracy": run["test_accuracy"][-1]}
        print(f"{precision} vs {base_name}: time {run['seconds'] / base['seconds']:.2f}x, "
              f"loss within {100 * loss_gap:.1f}%, final accuracy {100 * run['test_accuracy'][-1]:.1f} "
              f"({100 * accuracy_gap:+.1f} points)")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
