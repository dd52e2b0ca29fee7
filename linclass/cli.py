"""Command line: ``python -m linclass {train,demo,ops}`` (also installed as ``linclass``).

    linclass train --model svm|softmax|twolayer [--dataset digits|cifar10|folder] ...
    linclass demo        all three models on scikit-learn's digits (bundled), one table
    linclass ops         the fused ops against torch.nn.functional (forward + backward)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# Hyperparameters of a run, per model and dataset kind (--search replaces lr and reg):
# digits has 64 features, the image datasets 3072 (CIFAR-10 values, chosen on its
# validation split).  The linear models on photos train on batches of 1000 for 4000
# iterations: on CIFAR-10 that gained 0.5 (SVM) and 0.4 (softmax) points of validation
# accuracy over the classic 2000 x 200, and their searches stay near a minute here.
DEFAULTS = {
    ("svm", "digits"): dict(lr=0.1, reg=1e-3, iters=1000, batch_size=200),
    ("softmax", "digits"): dict(lr=0.5, reg=1e-3, iters=1000, batch_size=200),
    ("twolayer", "digits"): dict(lr=3.0, reg=1e-4, iters=1000, batch_size=200, hidden=64, decay=0.95),
    ("svm", "images"): dict(lr=1.2e-3, reg=2e-2, iters=4000, batch_size=1000),  # standardized
    ("softmax", "images"): dict(lr=1e-1, reg=1e-4, iters=4000, batch_size=1000),
    ("twolayer", "images"): dict(lr=1.0, reg=5e-4, iters=4000, batch_size=200, hidden=1024, decay=0.81),
}


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        raise UsageError(message)


def _progress(total, desc, quiet):
    """(callback(it), close()) for a tqdm bar, or no-ops when quiet / tqdm is missing."""
    if quiet:
        return None, lambda: None
    try:
        from tqdm import tqdm
    except ImportError:
        return None, lambda: None
    bar = tqdm(total=total, desc=desc, unit="it", leave=False, dynamic_ncols=True, file=sys.stderr)
    return (lambda it: bar.update(1)), bar.close


def _load_data(args):
    import torch

    from . import data

    device = _device(args.device)
    bias = args.model != "twolayer"  # the linear models take the bias trick (a ones column)
    if args.dataset == "digits":
        return data.load_digits(validation_ratio=args.val_ratio, seed=args.seed, device=device,
                                bias_trick=bias)
    if args.dataset == "cifar10":
        root = args.data_dir or os.path.join(os.path.expanduser("~"), ".cache", "linclass", "cifar10")
        return data.preprocess_cifar10(validation_ratio=args.val_ratio, root=root, seed=args.seed,
                                       dtype=torch.float32, device=device, bias_trick=bias)
    if not args.train_dir:
        raise UsageError("--dataset folder needs --train-dir DIR (and optionally --test-dir DIR)")
    return data.load_image_folder(args.train_dir, args.test_dir, validation_ratio=args.val_ratio,
                                  seed=args.seed, device=device, bias_trick=bias)


def _device(name):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    return torch.device(name)


def _accuracy(model, X, y):
    if X is None:
        return None
    return 100.0 * (model.predict(X) == y).double().mean().item()


def run_train(args) -> dict:
    """Train (or search) one model; returns the results dict (the --json content)."""
    import torch

    from . import backends, data, linear_classifier as lc, plots, two_layer_net as tln

    kind = "digits" if args.dataset == "digits" else "images"
    hp = dict(DEFAULTS[(args.model, kind)])
    for key in ("lr", "reg", "iters", "batch_size", "hidden", "decay"):
        if getattr(args, key) is not None:
            hp[key] = getattr(args, key)
    if args.model != "twolayer":
        hp.pop("hidden", None), hp.pop("decay", None)
    elif args.hidden is not None and args.hidden < 1:
        raise UsageError(f"--hidden must be at least 1, got {args.hidden}")
    if hp["iters"] < 0 or hp["batch_size"] < 1:
        raise UsageError("--iters must be >= 0 and --batch-size >= 1")

    torch.manual_seed(args.seed)
    d = _load_data(args)
    # --standardize auto: pixels divided by their spread for the SVM on photos (+0.2
    # points on CIFAR-10 with mirror images; the softmax lost 0.2 and stays centred only).
    standardize = args.standardize
    if standardize == "auto":
        standardize = "on" if args.model == "svm" and kind == "images" else "off"
    hp["standardize"] = standardize
    if standardize == "on":
        d = data.standardize(d)  # every split, with the training split's statistics
    # --augment auto: mirror images on photos (not for digits, whose mirror images are
    # other shapes).  On CIFAR-10 they gained ~1.8 points for the two-layer net and, at
    # 4000 x 1000, 0.2 (SVM) and 0.5 (softmax) for the linear models.
    augment = args.augment
    if augment == "auto":
        augment = "flip" if kind == "images" else "none"
    hp["augment"] = augment
    train_d = data.mirror_augment(d) if augment == "flip" else d  # training sees this
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    C = int(max(d["y_train"].max(), d["y_val"].max()).item()) + 1
    D = d["X_train"].shape[1]
    t0 = time.perf_counter()
    search = None
    if args.model in ("svm", "softmax"):
        cls = lc.LinearSVM if args.model == "svm" else lc.Softmax
        if args.search:
            lrs, regs = (lc.svm_get_search_params(standardized=standardize == "on") if args.model == "svm"
                         else lc.softmax_get_search_params())
            step, close = _progress(hp["iters"], f"{args.model}: {len(lrs) * len(regs)} configs at once",
                                    args.quiet)
            search = lc.sweep(cls, train_d, lrs, regs, num_iters=hp["iters"], batch_size=hp["batch_size"],
                              seed=args.seed, progress=step)
            close()
            model = search["best_model"]
            hp["lr"], hp["reg"] = search["best"]
            history = None
        else:
            model = cls()
            if args.load:
                model.load(args.load)
                _check_shape(model.W.shape, (D, C), args.load)
                model.W = model.W.to(d["X_train"])
            step, close = _progress(hp["iters"], args.model, args.quiet)
            history = model.train(train_d["X_train"], train_d["y_train"], hp["lr"], hp["reg"], hp["iters"],
                                  hp["batch_size"], progress=step)
            close()
    else:
        if args.search:
            hs, regs, lrs, decays = tln.nn_get_search_params()
            total = len(hs) * len(regs) * len(lrs) * len(decays)
            step, close = _progress(total, f"twolayer: {total} configs", args.quiet)
            model, stat, _ = tln.find_best_net(
                train_d, tln.nn_get_search_params, num_iters=hp["iters"], batch_size=hp["batch_size"],
                seed=args.seed, progress=(lambda *a: step(0)) if step else None)
            close()
            cfg = stat["config"]
            hp.update(hidden=cfg["hidden_size"], reg=cfg["reg"], lr=cfg["learning_rate"],
                      decay=cfg["learning_rate_decay"])
        else:
            model = tln.TwoLayerNet(D, hp["hidden"], C, dtype=d["X_train"].dtype,
                                    device=d["X_train"].device)
            if args.load:
                model.load(args.load)
            step, close = _progress(hp["iters"], "twolayer", args.quiet)
            stat = model.train(train_d["X_train"], train_d["y_train"], d["X_val"], d["y_val"],
                               learning_rate=hp["lr"], learning_rate_decay=hp["decay"],
                               reg=hp["reg"], num_iters=hp["iters"], batch_size=hp["batch_size"],
                               progress=step)
            close()
        history = stat["loss_history"]
    seconds = time.perf_counter() - t0

    result = {
        "model": args.model, "dataset": args.dataset, "hyperparameters": hp,
        "search": bool(args.search),
        "train_acc": _accuracy(model, d["X_train"], d["y_train"]),
        "val_acc": _accuracy(model, d["X_val"], d["y_val"]),
        "test_acc": _accuracy(model, d["X_test"], d["y_test"]),
        "n_train": len(d["y_train"]), "n_val": len(d["y_val"]),
        "n_test": len(d["y_test"]) if d["y_test"] is not None else 0,
        "seconds": round(seconds, 3), "backend": backends.resolve(d["X_train"].device),
    }
    if search is not None:
        result["search_results"] = [{"lr": k[0], "reg": k[1], "train_acc": v[0], "val_acc": v[1]}
                                    for k, v in search["results"].items()]
    if args.out:
        _write_outputs(args, model, d, history, search, stat if args.model == "twolayer" else None,
                       result, plots)
    return result


def _check_shape(got, want, path):
    if tuple(got) != tuple(want):
        raise UsageError(f"checkpoint {path} holds W of shape {tuple(got)}, the data needs {tuple(want)}")


def _write_outputs(args, model, d, history, search, stat, result, plots):
    out = args.out
    model.save(os.path.join(out, "model.pt"))
    if history:
        plots.loss_history(history, os.path.join(out, "loss.png"))
    shape = d.get("image_shape")
    if args.model == "twolayer":
        if stat and stat.get("val_acc_history"):
            plots.accuracy_curves(stat, os.path.join(out, "accuracy.png"))
        if shape:
            plots.net_weights(model.params["W1"], shape, os.path.join(out, "weights.png"))
    elif shape:
        plots.linear_weights(model.W, d.get("classes"), shape, os.path.join(out, "weights.png"))
    if search is not None:
        plots.sweep_scatter(search["results"], os.path.join(out, "search.png"))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)


def _table(rows):
    def fmt(v):
        return "-" if v is None else f"{v:.2f}"

    lines = [f"{'model':<10}{'train %':>9}{'val %':>9}{'test %':>9}{'seconds':>9}"]
    for r in rows:
        lines.append(f"{r['model']:<10}{fmt(r['train_acc']):>9}{fmt(r['val_acc']):>9}"
                     f"{fmt(r['test_acc']):>9}{r['seconds']:>9.1f}")
    return "\n".join(lines)


def _add_train_args(p):
    p.add_argument("--model", choices=["svm", "softmax", "twolayer"], required=True)
    p.add_argument("--dataset", choices=["digits", "cifar10", "folder"], default="digits")
    p.add_argument("--data-dir", help="CIFAR-10 root (official python pickles, or downloaded there)")
    p.add_argument("--train-dir", help="image folder: train_dir/<class>/<image>")
    p.add_argument("--test-dir", help="image folder with the same class names (optional)")
    p.add_argument("--search", action="store_true",
                   help="run the model's default hyperparameter search on the validation split")
    p.add_argument("--lr", type=float)
    p.add_argument("--reg", type=float)
    p.add_argument("--iters", type=int)
    p.add_argument("--batch-size", type=int,
                   help="minibatch size (default 200; 1000 for svm and softmax on photos)")
    p.add_argument("--hidden", type=int, help="hidden units (twolayer)")
    p.add_argument("--decay", type=float, help="learning-rate decay per epoch (twolayer)")
    p.add_argument("--augment", choices=["auto", "none", "flip"], default="auto",
                   help="flip: train on the training images and their mirror images too; "
                        "auto (default): flip on photos (cifar10, folder), none on digits")
    p.add_argument("--standardize", choices=["auto", "on", "off"], default="auto",
                   help="on: divide each pixel by its standard deviation over the training split "
                        "(after the mean is subtracted); auto (default): on for svm on photos")
    p.add_argument("--val-ratio", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--load", help="start from this checkpoint (saved by --out); --iters 0 evaluates it")
    p.add_argument("--out", help="folder for the checkpoint, PNG plots and results.json")
    p.add_argument("--json", help="write the results as JSON to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _demo(quiet) -> None:
    import linclass

    print(f"linclass {linclass.__version__}: backends {linclass.backends.available()}; "
          "all three models on scikit-learn's digits (1797 8x8 images, 10 classes)")
    rows = []
    for model in ("svm", "softmax", "twolayer"):
        args = _parser().parse_args(["train", "--model", model, "--device", "cpu"]
                                    + (["--quiet"] if quiet else []))
        rows.append(run_train(args))
    print(_table(rows))


def _ops() -> None:
    import torch
    import torch.nn.functional as F

    import linclass

    print(f"linclass {linclass.__version__}: backends {linclass.backends.available()}, "
          f"CPU kernels built for {linclass._extension.cpu_isa()}")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    from .data import DataError

    try:
        args = _parser().parse_args(argv)
        if args.command == "demo":
            _demo(args.quiet)
        elif args.command == "ops":
            _ops()
        else:
            result = run_train(args)
            print(_table([result]))
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(result, f, indent=1)
    except (UsageError, DataError, ValueError, FileNotFoundError, NotADirectoryError,
            PermissionError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"linclass: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
