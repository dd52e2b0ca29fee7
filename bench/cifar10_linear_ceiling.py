"""How far a linear classifier gets on CIFAR-10, optimizer noise aside: the regularized
objective minimized to convergence by full-batch L-BFGS (torch.optim.LBFGS, strong Wolfe
line search), then validation accuracy.  Same split as bench/cifar10_holdout.sh (the
40,000 non-test images, the CLI's seeded 80/20 split, mirror images appended).

    python bench/cifar10_linear_ceiling.py SPLIT/train {pixels,standardized,zca:EPS,hog-hue} \\
        {softmax,svm} REG[,REG...] [--iters 300]

Results: bench/results/cifar10-holdout/experiments.md ("Linear models at convergence")."""

import argparse
import time

import torch
import torch.nn.functional as F

from linclass.workflow import data, features


def main():
    p = argparse.ArgumentParser()
    p.add_argument("train_dir")
    p.add_argument("inputs")
    p.add_argument("loss", choices=["softmax", "svm"])
    p.add_argument("regs")
    p.add_argument("--iters", type=int, default=300)
    a = p.parse_args()
    d = data.load_image_folder(a.train_dir, None, validation_ratio=0.2, seed=0, bias_trick=True)
    if a.inputs == "standardized":
        d = data.standardize(d)
    elif a.inputs.startswith("zca:"):
        eps = float(a.inputs[4:])
        X = d["X_train"][:, :-1]
        e, V = torch.linalg.eigh((X.T @ X / len(X)).double())
        zca = ((V / torch.sqrt(e + eps)) @ V.T).float()
        for k in ("X_train", "X_val"):
            d[k] = torch.cat([d[k][:, :-1] @ zca, d[k][:, -1:]], dim=1)
    elif a.inputs == "hog-hue":
        d = features.featurize(d, mirrored=True)
    elif a.inputs != "pixels":
        raise SystemExit(f"unknown inputs {a.inputs}")
    n = len(d["y_train"])
    d = data.mirror_augment(d)
    X, y, Xv, yv = d["X_train"], d["y_train"], d["X_val"], d["y_val"]
    for reg in (float(r) for r in a.regs.split(",")):
        W = torch.zeros(X.shape[1], 10, requires_grad=True)
        opt = torch.optim.LBFGS([W], max_iter=a.iters, history_size=20, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-9, tolerance_change=1e-12)

        def closure():
            opt.zero_grad()
            s = X @ W
            loss = F.cross_entropy(s, y) if a.loss == "softmax" else F.multi_margin_loss(s, y) * 10
            loss = loss + reg * (W * W).sum()
            loss.backward()
            return loss

        t = time.perf_counter()
        opt.step(closure)
        with torch.no_grad():
            train = 100 * ((X[:n] @ W).argmax(1) == y[:n]).double().mean().item()
            val = 100 * ((Xv @ W).argmax(1) == yv).double().mean().item()
        print(f"{a.inputs} {a.loss} reg {reg:g}: train {train:.2f} val {val:.2f} "
              f"({time.perf_counter() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
