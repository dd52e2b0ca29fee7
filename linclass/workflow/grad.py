"""Numeric gradient checks of the classic assignment code."""

from __future__ import annotations

import random

import torch


def rel_error(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-10) -> float:
    """max |x - y| / (|x| + |y|), elementwise, with eps guarding 0/0."""
    top = (x - y).abs().max().item()
    bot = (x.abs() + y.abs()).clamp(min=eps).max().item()
    return top / bot


def compute_numeric_gradient(f, x: torch.Tensor, dLdf: torch.Tensor | None = None, h: float = 1e-7):
    """Centered differences of f at x, contracted with the upstream gradient dLdf (ones
    when None): returns d(sum(f(x) * dLdf)) / dx, shaped like x.

    x (contiguous) is perturbed in place one entry at a time and restored.
    """
    if not x.is_contiguous():
        raise ValueError("compute_numeric_gradient needs a contiguous x")
    flat_x = x.view(-1)
    flat_grad = torch.zeros_like(flat_x)
    dLdf = (torch.ones_like(f(x)) if dLdf is None else dLdf).flatten()
    for i in range(flat_x.shape[0]):
        old = flat_x[i].item()
        flat_x[i] = old + h
        pos = f(x).flatten()
        flat_x[i] = old - h
        neg = f(x).flatten()
        flat_x[i] = old
        flat_grad[i] = dLdf.dot((pos - neg) / (2 * h))
    return flat_grad.view_as(x)


def grad_check_sparse(f, x: torch.Tensor, analytic_grad: torch.Tensor, num_checks: int = 10,
                      h: float = 1e-7) -> list[float]:
    """Compare analytic_grad with centered differences of scalar f at random positions.

    Prints and returns the relative errors.
    """
    errors = []
    for _ in range(num_checks):
        ix = tuple(random.randrange(m) for m in x.shape)
        old = x[ix].item()
        x[ix] = old + h
        fxph = float(f(x))
        x[ix] = old - h
        fxmh = float(f(x))
        x[ix] = old
        numeric = (fxph - fxmh) / (2 * h)
        analytic = float(analytic_grad[ix])
        err = abs(numeric - analytic) / max(abs(numeric) + abs(analytic), 1e-12)
        errors.append(err)
        print(f"numerical: {numeric:f} analytic: {analytic:f}, relative error: {err:e}")
    return errors
