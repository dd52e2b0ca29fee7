"""Command line: ``python -m linclass {train,demo,ops}`` (also installed as ``linclass``).

    linclass train --model svm|softmax|twolayer [--dataset digits|cifar10|folder] ...
    linclass demo        all three models on scikit-learn's digits (bundled), one table
    linclass ops         the fused ops against torch.nn.functional (forward + backward)
    linclass split SRC OUT [--test N]   set N images of a folder aside as a test split
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .train import UsageError, run_train


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        raise UsageError(message)


def _table(rows):
    def fmt(v):
        return "-" if v is None else f"{v:.2f}"

    sk = any("sklearn" in r for r in rows)
    lines = [f"{'model':<10}{'train %':>9}{'val %':>9}{'test %':>9}{'seconds':>9}"
             + (f"   {'scikit-learn':<20}{'test %':>7}{'seconds':>9}" if sk else "")]
    for r in rows:
        line = (f"{r['model']:<10}{fmt(r['train_acc']):>9}{fmt(r['val_acc']):>9}"
                f"{fmt(r['test_acc']):>9}{r['seconds']:>9.1f}")
        if "sklearn" in r:
            name, acc, seconds = r["sklearn"]
            line += f"   {name:<20}{fmt(acc):>7}{seconds:>9.1f}"
        lines.append(line)
    return "\n".join(lines)


def _add_train_args(p):
    p.add_argument("--model", choices=["svm", "softmax", "twolayer"], required=True)
    p.add_argument("--dataset", choices=["digits", "cifar10", "folder"], default="digits")
    p.add_argument("--data-dir", help="CIFAR-10 root (official python pickles, or downloaded there)")
    p.add_argument("--train-dir", help="image folder: train_dir/<class>/<image>")
    p.add_argument("--test-dir", help="image folder with the same class names (optional)")
    p.add_argument("--search", action="store_true",
                   help="run the model's default hyperparameter search on the validation split, "
                        "then train the chosen configuration on training + validation (refit)")
    p.add_argument("--no-refit", dest="refit", action="store_false",
                   help="with --search: keep the model the search trained (without the "
                        "validation split) instead of refitting")
    p.add_argument("--lr", type=float)
    p.add_argument("--reg", type=float)
    p.add_argument("--iters", type=int)
    p.add_argument("--batch-size", type=int,
                   help="minibatch size (default 200; 1000 for svm and softmax on photos)")
    p.add_argument("--hidden", type=int, help="hidden units (twolayer)")
    p.add_argument("--decay", type=float, help="learning-rate decay per epoch (twolayer)")
    p.add_argument("--momentum", type=float,
                   help="Nesterov momentum, 0 for plain SGD (twolayer; default 0.9 on digits, 0 on photos)")
    p.add_argument("--init-std", type=float, help="std of the initial weights (twolayer)")
    p.add_argument("--augment", choices=["auto", "none", "flip", "shift", "crop-flip"], default="auto",
                   help="flip: train on the training images and their mirror images too; "
                        "shift: every minibatch shifted at random by up to 1/16 of the image "
                        "size; crop-flip: shifted and mirrored at random (shift and crop-flip: "
                        "twolayer only); auto (default): flip on photos, none on digits for "
                        "the linear models and shift for the two-layer net")
    p.add_argument("--standardize", choices=["auto", "on", "off"], default="auto",
                   help="on: divide each pixel by its standard deviation over the training split "
                        "(after the mean is subtracted); auto (default): on for svm on photos")
    p.add_argument("--features", choices=["auto", "pixels", "hog-hue"], default="auto",
                   help="what the model sees: pixels, or hog-hue image features (histograms of "
                        "oriented gradients over 4x4 and 8x8 cells and a hue histogram, "
                        "standardized; svm and softmax on photos only); auto (default): "
                        "hog-hue for svm and softmax on photos, pixels otherwise")
    p.add_argument("--val-ratio", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--load", help="start from this checkpoint (saved by --out); --iters 0 evaluates it")
    p.add_argument("--out", help="folder for the checkpoint, PNG plots and results.json")
    p.add_argument("--json", help="write the results as JSON to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


# The demo's scikit-learn counterparts: library defaults, max_iter raised until they converge.
SKLEARN_COUNTERPARTS = {
    "svm": ("LinearSVC", "sklearn.svm", "LinearSVC", dict(max_iter=100_000)),
    "softmax": ("LogisticRegression", "sklearn.linear_model", "LogisticRegression", dict(max_iter=100_000)),
    "twolayer": ("MLPClassifier", "sklearn.neural_network", "MLPClassifier",
                 dict(max_iter=100_000, random_state=0)),
}


def _sklearn_row(model, d):
    """(name, test accuracy %, seconds) of `model`'s scikit-learn counterpart fitted on
    the demo's training split (the same rows, no bias column: it fits an intercept)."""
    import importlib

    name, module, cls, kwargs = SKLEARN_COUNTERPARTS[model]
    estimator = getattr(importlib.import_module(module), cls)(**kwargs)
    start = time.perf_counter()
    estimator.fit(d["X_train"].cpu().numpy(), d["y_train"].cpu().numpy())
    seconds = time.perf_counter() - start
    return name, 100.0 * estimator.score(d["X_test"].cpu().numpy(), d["y_test"].cpu().numpy()), seconds


def _demo(quiet) -> None:
    import linclass

    from . import data

    print(f"linclass {linclass.__version__}: backends {linclass.backends.available()}; "
          "all three models on scikit-learn's digits (1797 8x8 images, 10 classes), each beside "
          "its scikit-learn counterpart trained on the same split")
    digits = data.load_digits(device="cpu")  # run_train's split: the same seeds
    rows = []
    for model in ("svm", "softmax", "twolayer"):
        args = _parser().parse_args(["train", "--model", model, "--device", "cpu"]
                                    + (["--quiet"] if quiet else []))
        rows.append(run_train(args))
        rows[-1]["sklearn"] = _sklearn_row(model, digits)
    print(_table(rows))


def _ops() -> None:
    import torch
    import torch.nn.functional as F

    import linclass

    print(f"linclass {linclass.__version__}: backends {linclass.backends.available()}, "
          f"CPU kernels {linclass.backends.cpu_isa()} (this CPU runs "
          f"{', '.join(linclass.backends.cpu_isas())}; LINCLASS_CPU_ISA picks one)")
    print(f"{'op':<20}{'shape':>12}{'|loss-torch|':>14}{'|grad-torch|':>14}"
          f"{'torch ms':>10}{'linclass ms':>13}")
    for name, ours, theirs in [("cross_entropy", linclass.cross_entropy, F.cross_entropy),
                               ("multi_margin_loss", linclass.multi_margin_loss, F.multi_margin_loss)]:
        for n, c in [(65536, 10), (4096, 1000)]:
            x = torch.randn(n, c)
            t = torch.randint(0, c, (n,))
            out = {}
            for key, fn in (("torch", theirs), ("ours", ours)):
                xr = x.clone().requires_grad_()
                best = float("inf")
                for _ in range(5):
                    xr.grad = None
                    start = time.perf_counter()
                    loss = fn(xr, t)
                    loss.backward()
                    best = min(best, time.perf_counter() - start)
                out[key] = (loss.detach(), xr.grad, best * 1e3)
            dl = (out["ours"][0] - out["torch"][0]).abs().item()
            dg = (out["ours"][1] - out["torch"][1]).abs().max().item()
            print(f"{name:<20}{f'{n}x{c}':>12}{dl:>14.2e}{dg:>14.2e}"
                  f"{out['torch'][2]:>10.2f}{out['ours'][2]:>13.2f}")


def _parser():
    parser = _Parser(prog="linclass", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train_args(sub.add_parser("train", help="train a classifier (or search its hyperparameters)"))
    demo = sub.add_parser("demo", help="all three models on the bundled digits data")
    demo.add_argument("--quiet", action="store_true")
    sub.add_parser("ops", help="the fused ops against torch (forward + backward)")
    split = sub.add_parser("split", help="set part of an image folder aside as a test split "
                                         "(symbolic links; for datasets shipped without one)")
    split.add_argument("src", help="image folder: src/<class>/<image>")
    split.add_argument("out", help="gets out/train/<class>/ and out/test/<class>/")
    split.add_argument("--test", type=int, default=10000, help="images set aside (default 10000)")
    split.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .data import DataError

    try:
        args = _parser().parse_args(argv)
        if args.command == "demo":
            _demo(args.quiet)
        elif args.command == "ops":
            _ops()
        elif args.command == "split":
            from .data import split_image_folder

            train_dir, test_dir = split_image_folder(args.src, args.out, args.test, args.seed)
            print(f"train: {train_dir}\ntest:  {test_dir}")
        else:
            from . import parallel

            result = run_train(args)
            if parallel.is_main():  # under torchrun: rank 0 reports
                print(_table([result]))
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump(result, f, indent=1)
            parallel.finish()
    except (UsageError, DataError, ValueError, FileNotFoundError, NotADirectoryError,
            PermissionError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"linclass: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
