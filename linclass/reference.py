"""Naive reference losses: explicit Python loops over rows and classes, in float64.

These are the test oracle for every kernel.  Each returns ``(loss, grad_input)`` where
``grad_input`` is d(sum(loss * grad_output)) / d input (grad_output defaults to ones),
written out by hand the way the classic "naive" assignment code does.
"""

from __future__ import annotations

import math

import torch


def _rows(input: torch.Tensor) -> tuple[list[list[float]], tuple, callable]:
    """input (C,), (N, C) or (N, C, d...) -> list of rows, and a function that maps a
    list of per-row gradients back to the input's shape."""
    x = input.detach().to(torch.float64)
    if x.dim() == 1:
        rows = [x.tolist()]
        moved_shape = (1, x.shape[0])
    else:
        moved = x.movedim(1, -1)
        moved_shape = tuple(moved.shape)
        rows = moved.reshape(-1, x.shape[1]).tolist()

    def back(grads: list[list[float]]) -> torch.Tensor:
        g = torch.tensor(grads, dtype=torch.float64).reshape(moved_shape)
        return g.reshape(x.shape) if x.dim() == 1 else g.movedim(-1, 1).contiguous()

    return rows, moved_shape, back


def _scales(grad_output, reduction: str, n_rows: int) -> list[float]:
    if reduction == "none":
        if grad_output is None:
            return [1.0] * n_rows
        return grad_output.detach().to(torch.float64).reshape(-1).tolist()
    g = 1.0 if grad_output is None else float(grad_output)
    return [g] * n_rows


def _reduce(losses: list[float], reduction: str, denom: float, out_shape) -> torch.Tensor:
    if reduction == "none":
        return torch.tensor(losses, dtype=torch.float64).reshape(out_shape)
    total = 0.0
    for v in losses:
        total += v
    if reduction == "sum":
        return torch.tensor(total, dtype=torch.float64)
    return torch.tensor(total / denom if denom != 0 else math.nan, dtype=torch.float64)


def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, grad_output=None):
    """Softmax cross-entropy with class-index or class-probability targets."""
    rows, _, back = _rows(input)
    C = input.shape[0] if input.dim() == 1 else input.shape[1]
    w = [1.0] * C if weight is None else weight.detach().to(torch.float64).tolist()
    W = sum(w)
    eps = float(label_smoothing)
    soft = target.is_floating_point()
    if soft:
        trows, _, _ = _rows(target)
    else:
        tflat = target.reshape(-1).tolist()
    out_shape = () if input.dim() == 1 else (input.shape[0],) + tuple(input.shape[2:])
    scales = _scales(grad_output, reduction, len(rows))

    losses, grads, ignored, denom = [], [], [], 0.0
    for r, x in enumerate(rows):
        m = max(x)
        s = 0.0
        for j in range(C):
            s += math.exp(x[j] - m)
        lse = m + math.log(s)
        p = [math.exp(x[j] - lse) for j in range(C)]
        g = [0.0] * C
        loss = 0.0
        if soft:
            t = [(1 - eps) * trows[r][j] + eps / C for j in range(C)]
            wt = 0.0
            for j in range(C):
                loss += w[j] * t[j] * (lse - x[j])
                wt += w[j] * t[j]
            for j in range(C):
                g[j] = wt * p[j] - w[j] * t[j]
            denom += 1.0
        else:
            y = int(tflat[r])
            if y != ignore_index:
                loss = (1 - eps) * w[y] * (lse - x[y])
                for j in range(C):
                    loss += eps / C * w[j] * (lse - x[j])
                for j in range(C):
                    g[j] = (1 - eps) * w[y] * (p[j] - (1.0 if j == y else 0.0))
                    g[j] += eps / C * (W * p[j] - w[j])
                denom += w[y]
        losses.append(loss)
        grads.append(g)
        ignored.append(not soft and int(tflat[r]) == ignore_index)

    if soft and reduction == "mean":
        denom = float(len(rows))
    div = 1.0
    if reduction == "mean":
        div = denom if denom != 0 else math.nan
    for r, g in enumerate(grads):
        if not ignored[r]:  # ignored rows keep an exact zero gradient
            for j in range(C):
                g[j] = g[j] * scales[r] / div
    return _reduce(losses, reduction, denom, out_shape), back(grads)


def multi_margin_loss(input, target, p=1, margin=1.0, weight=None, reduction="mean",
                      grad_output=None):
    """Multi-class hinge loss, as torch.nn.functional.multi_margin_loss."""
    rows, _, back = _rows(input)
    C = input.shape[-1]
    w = [1.0] * C if weight is None else weight.detach().to(torch.float64).tolist()
    tflat = target.reshape(-1).tolist()
    scales = _scales(grad_output, reduction, len(rows))
    losses, grads = [], []
    for r, x in enumerate(rows):
        y = int(tflat[r])
        loss = 0.0
        g = [0.0] * C
        for j in range(C):
            if j == y:
                continue
            z = margin - x[y] + x[j]
            if z > 0:
                loss += w[y] * (z if p == 1 else z * z)
                d = w[y] * (1.0 if p == 1 else 2.0 * z)
                g[j] += d / C
                g[y] -= d / C
        losses.append(loss / C)
        grads.append(g)
    div = float(len(rows)) if reduction == "mean" else 1.0
    for r, g in enumerate(grads):
        for j in range(C):
            g[j] = g[j] * scales[r] / div
    return _reduce(losses, reduction, float(len(rows)), tuple(target.shape)), back(grads)
