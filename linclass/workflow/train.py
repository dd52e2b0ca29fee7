"""`linclass train`: one model trained (or searched) on a dataset, evaluated, saved and
plotted.  run_train(args) takes the parsed command line (workflow/cli.py)."""

from __future__ import annotations

import json
import os
import sys
import time

# Hyperparameters of a run, per model and dataset kind (--search replaces lr and reg):
# digits has 64 features, the image datasets 3072.  The digits values were chosen by
# 5-fold cross-validation on the 1,438 non-test images (docs/workflow.md); the image
# values on the CIFAR-10 validation split (docs/cifar10.md).  The linear models on photos
# train on batches of 1000 for 8000 iterations: on CIFAR-10 longer runs at smaller
# learning rates gained ~1 point over the classic 2000 x 200, and their searches stay
# under two minutes here.  momentum > 0 is Nesterov momentum; init_std the std of the
# two-layer net's initial weights.
DEFAULTS = {
    ("svm", "digits"): dict(lr=0.1, reg=1e-3, iters=3000, batch_size=200),
    ("softmax", "digits"): dict(lr=0.5, reg=1e-4, iters=3000, batch_size=200),
    ("twolayer", "digits"): dict(lr=0.3, reg=1e-4, iters=1000, batch_size=200, hidden=256, decay=0.99,
                                 momentum=0.9, init_std=0.05),
    ("svm", "images"): dict(lr=3e-4, reg=8e-2, iters=8000, batch_size=1000),  # standardized
    ("softmax", "images"): dict(lr=5e-2, reg=1e-3, iters=8000, batch_size=1000),
    ("twolayer", "images"): dict(lr=1.0, reg=5e-4, iters=12000, batch_size=200, hidden=1024, decay=0.95,
                                 momentum=0.0, init_std=1e-4),
    # Image features (--features hog-hue, the linear models' default on photos): 731
    # standardized numbers per image; values chosen on the CIFAR-10 validation split.
    ("svm", "features"): dict(lr=3e-4, reg=3e-2, iters=8000, batch_size=1000),
    ("softmax", "features"): dict(lr=5e-3, reg=1e-2, iters=8000, batch_size=1000),
}
TWOLAYER_ONLY = ("hidden", "decay", "momentum", "init_std")
# --augment auto, per model and dataset kind.  flip: the mirror images appended to the
# training split (data.mirror_augment); shift / crop-flip: every minibatch shifted by up
# to 1/16 of the image size (and mirrored at random), data.random_crop_flip, which the
# two-layer net's training loop applies (the linear models' fused SGD step takes rows
# of the stored split).  Digits are not mirrored (a mirror image is another shape).
AUGMENT_AUTO = {("svm", "digits"): "none", ("softmax", "digits"): "none",
                ("twolayer", "digits"): "shift", ("svm", "images"): "flip",
                ("softmax", "images"): "flip", ("twolayer", "images"): "crop-flip",
                ("svm", "features"): "flip", ("softmax", "features"): "flip"}
# --features auto: the linear models on photos see image features (HOG + hue histogram,
# workflow/features.py), since a linear model on raw pixels has a low ceiling there
# (docs/cifar10.md); the two-layer net learns its own features from the pixels.
FEATURES_AUTO = {"svm": "hog-hue", "softmax": "hog-hue", "twolayer": "pixels"}


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit code 2."""


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

    from linclass import backends

    from . import data, features as image_features, linear_classifier as lc, parallel, plots, sweep
    from . import two_layer_net as tln

    kind = "digits" if args.dataset == "digits" else "images"
    features = getattr(args, "features", "auto")
    if features == "auto":
        features = FEATURES_AUTO[args.model] if kind == "images" else "pixels"
    if features == "hog-hue":
        if kind == "digits":
            raise UsageError("--features hog-hue needs RGB photos (digits are 8 x 8 gray images)")
        if args.model == "twolayer":
            raise UsageError("--features hog-hue is for the linear models (svm, softmax); "
                             "the two-layer net trains on pixels")
        if args.standardize == "on":
            raise UsageError("--standardize on divides pixels; image features are standardized already")
        kind = "features"
    hp = dict(DEFAULTS[(args.model, kind)])
    for key in ("lr", "reg", "iters", "batch_size") + TWOLAYER_ONLY:
        if getattr(args, key, None) is not None:
            hp[key] = getattr(args, key)
    if args.model != "twolayer":
        for key in TWOLAYER_ONLY:
            hp.pop(key, None)
    elif args.hidden is not None and args.hidden < 1:
        raise UsageError(f"--hidden must be at least 1, got {args.hidden}")
    elif not 0 <= hp["momentum"] < 1:
        raise UsageError(f"--momentum must be in [0, 1), got {hp['momentum']}")
    if hp["iters"] < 0 or hp["batch_size"] < 1:
        raise UsageError("--iters must be >= 0 and --batch-size >= 1")
    augment = AUGMENT_AUTO[(args.model, kind)] if args.augment == "auto" else args.augment
    if augment in ("shift", "crop-flip") and args.model != "twolayer":
        raise UsageError(f"--augment {augment} is for the two-layer net (it changes each minibatch); "
                         "the linear models take none or flip")
    refit = args.search and args.refit
    # Under torchrun: the two-layer net trains data parallel, a search spreads its
    # configurations over the processes, and rank 0 alone reports and writes.
    multi = parallel.init_from_env(_device(args.device))
    quiet = args.quiet or not parallel.is_main()

    torch.manual_seed(args.seed)
    d = _load_data(args)
    if augment != "none" and len(tuple(d.get("image_shape") or ())) != 3:
        raise UsageError(f"--augment {augment} needs images")
    # --standardize auto: pixels divided by their spread for the SVM on photos (+0.2
    # points on CIFAR-10 with mirror images; the softmax lost 0.2 and stays centred only).
    standardize = args.standardize
    if standardize == "auto":
        standardize = "on" if args.model == "svm" and kind == "images" else "off"
    hp["standardize"] = standardize
    if standardize == "on":
        d = data.standardize(d)  # every split, with the training split's statistics
    hp["features"] = features
    if features == "hog-hue":
        try:
            d = image_features.featurize(d, mirrored=augment == "flip")
        except ValueError as e:
            raise UsageError(f"--features hog-hue: {e}") from None
    hp["augment"] = augment
    augment_data = data.mirror_augment if augment == "flip" else None
    train_options = {}
    if args.model == "twolayer":
        if augment in ("shift", "crop-flip"):
            height = d["image_shape"][1]
            train_options["augment"] = data.random_crop_flip(
                d["image_shape"], pad=max(1, round(height / 16)), flip=augment == "crop-flip")
        train_options.update(momentum=hp["momentum"], nesterov=hp["momentum"] > 0)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    C = int(max(d["y_train"].max(), d["y_val"].max()).item()) + 1
    D = d["X_train"].shape[1]
    t0 = time.perf_counter()
    search = stat = None
    search_val = None
    if args.model in ("svm", "softmax"):
        cls = lc.LinearSVM if args.model == "svm" else lc.Softmax
        if args.search:
            lrs, regs = (lc.svm_get_search_params(standardized=standardize == "on",
                                                  features=kind == "features")
                         if args.model == "svm" else lc.softmax_get_search_params(features=kind == "features"))
            step, close = _progress(hp["iters"] * (2 if refit else 1),
                                    f"{args.model}: {len(lrs) * len(regs)} configs at once"
                                    + (" + refit" if refit else ""), quiet)
            search = sweep.sweep(cls, d, lrs, regs, num_iters=hp["iters"], batch_size=hp["batch_size"],
                                 seed=args.seed, progress=step, augment_data=augment_data, refit=refit,
                                 distribute=multi)
            close()
            model = search["best_model"]
            hp["lr"], hp["reg"] = search["best"]
            search_val = search["best_val"]
            history = None
        else:
            train_d = augment_data(d) if augment_data else d
            model = cls()
            if args.load:
                model.load(args.load)
                _check_shape(model.W.shape, (D, C), args.load)
                model.W = model.W.to(d["X_train"])
            step, close = _progress(hp["iters"], args.model, quiet)
            history = model.train(train_d["X_train"], train_d["y_train"], hp["lr"], hp["reg"], hp["iters"],
                                  hp["batch_size"], progress=step)
            close()
    else:
        if args.search:
            grid = tln.nn_get_search_params if kind == "images" else tln.nn_get_digits_search_params
            hs, regs, lrs, decays = grid()
            total = len(hs) * len(regs) * len(lrs) * len(decays) + (1 if refit else 0)
            step, close = _progress(total, f"twolayer: {total - refit} configs"
                                    + (" + refit" if refit else ""), quiet)
            model, stat, search_val = tln.find_best_net(
                d, grid, num_iters=hp["iters"], batch_size=hp["batch_size"], seed=args.seed,
                progress=(lambda *a: step(0)) if step else None, augment_data=augment_data,
                refit=refit, init_std=hp["init_std"], distribute=multi, **train_options)
            if step and refit:
                step(0)
            close()
            cfg = stat["config"]
            hp.update(hidden=cfg["hidden_size"], reg=cfg["reg"], lr=cfg["learning_rate"],
                      decay=cfg["learning_rate_decay"])
        else:
            train_d = augment_data(d) if augment_data else d
            model = tln.TwoLayerNet(D, hp["hidden"], C, dtype=d["X_train"].dtype,
                                    device=d["X_train"].device, std=hp["init_std"])
            if args.load:
                model.load(args.load)
            step, close = _progress(hp["iters"], "twolayer", quiet)
            stat = model.train(train_d["X_train"], train_d["y_train"], d["X_val"], d["y_val"],
                               learning_rate=hp["lr"], learning_rate_decay=hp["decay"],
                               reg=hp["reg"], num_iters=hp["iters"], batch_size=hp["batch_size"],
                               progress=step, data_parallel=multi, **train_options)
            close()
        history = stat["loss_history"]
    seconds = time.perf_counter() - t0

    # After a refit the model has trained on the validation split too: train_acc is
    # measured on train + validation, and val_acc is the search's (the chosen
    # configuration's accuracy on the validation split when it was held out).
    fit = data.train_plus_val(d) if refit else d
    result = {
        "model": args.model, "dataset": args.dataset, "hyperparameters": hp,
        "search": bool(args.search),
        "refit": refit,
        "train_acc": _accuracy(model, fit["X_train"], fit["y_train"]),
        "val_acc": search_val if refit else _accuracy(model, d["X_val"], d["y_val"]),
        "search_val_acc": search_val,
        "test_acc": _accuracy(model, d["X_test"], d["y_test"]),
        "n_train": len(fit["y_train"]), "n_val": len(d["y_val"]),
        "n_test": len(d["y_test"]) if d["y_test"] is not None else 0,
        "seconds": round(seconds, 3), "backend": backends.resolve(d["X_train"].device),
        "processes": parallel.size(),
    }
    if search is not None:
        result["search_results"] = [{"lr": k[0], "reg": k[1], "train_acc": v[0], "val_acc": v[1]}
                                    for k, v in search["results"].items()]
    if args.out and parallel.is_main():
        _write_outputs(args, model, d, history, search, stat, result, plots)
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
