"""The two phases of the class-sharded losses (linclass.distributed), on one rank's shard.

Each rank holds the scores x[:, a:b] of a global (N, C).  Phase 1 reduces its shard to a
few numbers per row; the ranks exchange them (one all-gather in linclass.distributed);
the merge turns the gathered numbers into the global loss and a few coefficients per
row, from which phase 2 writes this shard's slice of d loss / d scores, reading the
scores once more.  The gradient is made in the forward, as by the one-process fused
kernels, and the backward only rescales it.

The phases run as C++ kernels for CPU tensors with the 'cpp' backend
(csrc/cpu/sharded.cpp), as Triton kernels with the 'triton' backend (kernels/sharded.py,
the GPU default), and as the torch ops below otherwise ('torch', and 'cuda', which has no
phase kernels of its own).

Cross-entropy (the notation of csrc/cpu/cross_entropy.h; w = class weights, all ones
without `weight`, W = sum_j w_j, eps = label smoothing, k = 1 - eps, q = eps / C with the
global C):
  phase 1, rank r:  m_r = max_{j in r} x_j,  e_j = exp(x_j - m_r),
                    s_r = sum e_j,  s'_r = the same without the target class,
                    d_r = x_y - m_r (the owner of y only),  u_r = sum_j w_j (x_j - m_r)
  merge:            M = max_r m_r,  S = sum_r s_r exp(m_r - M),  S' likewise,
                    d_y = x_y - M,  U = sum_r u_r + W_r (m_r - M)
  loss:             k w_y (log S - d_y) + q (W log S - U)
  phase 2:          dx_j = scale [(k w_y + q W) e_j exp(m_r - M) / S - q w_j]
                    dx_y = scale [q (W e_y exp(m_r - M) / S - w_y) - k w_y S' / S]
S' is summed apart from the target's term (not S - e_y) so 1 - p_y keeps its precision
when the row is confident: the same formula as the one-process kernels.

Cross-entropy against class probabilities t (this rank's slice of the (N, C) target;
t'_j = k t_j + q):
  phase 1, rank r:  m_r, s_r as above,  T_r = sum_j w_j t'_j,  A_r = sum_j w_j t'_j (x_j - m_r)
  merge:            M, S as above,  T = sum_r T_r,  A = sum_r A_r + T_r (m_r - M)
  loss:             T log S - A  ('mean' divides by N, whatever the weights, as torch)
  phase 2:          dx_j = scale [T e_j exp(m_r - M) / S - w_j t'_j]

Multi-margin (hinge): h_j = margin - x_y + x_j for j != y, v = w_y / C:
  phase 1: the owner of y gives x_y (exchanged first: every rank needs it)
  phase 2: l_r = sum_{j in r, j != y} max(0, h_j)^p,  dx_j = scale v p max(0, h_j)^(p-1) [h_j > 0],
           t_r = sum of those dx_j; exchanged, loss = v sum_r l_r, dx_y = -sum_r t_r.

All arithmetic is in float32 for float32/half inputs (float64 for float64), as in the
one-process kernels.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import backends
from ._ops import accumulation_dtype


def mean_of(total: Tensor, denominator) -> Tensor:
    """A 'mean': total / denominator, NaN where the denominator is 0 (target weights that
    sum to zero, or no kept row), as torch's 0 / 0; total / 0 would give inf once label
    smoothing makes the total non-zero."""
    quotient = total / denominator
    return torch.where(torch.as_tensor(denominator, device=quotient.device) != 0, quotient,
                       torch.full_like(quotient, float("nan")))


def phase_kernels(x: Tensor) -> str | None:
    """Which kernels run the phases of a shard on x's device: "cpp" (csrc/cpu/sharded.cpp,
    CPU tensors), "triton" (kernels/sharded.py, the Triton backend), or None for the
    torch ops below (the torch backend, and the CUDA C++ backend, which has no phase
    kernels of its own)."""
    name = backends.resolve(x.device)
    if name == "cpp" and x.device.type == "cpu":
        return "cpp"
    return "triton" if name == "triton" else None


def _triton():
    from .kernels import sharded

    return sharded


def _ownership(target: Tensor, start: int, width: int, ignore_index: int | None):
    """(rows whose target class lies in this shard, the target's column in the shard)."""
    local = target - start
    own = (local >= 0) & (local < width)
    if ignore_index is not None:
        own &= target != ignore_index
    return own, local.clamp(0, max(width - 1, 0)).unsqueeze(1)


# ---- cross-entropy -----------------------------------------------------------------

CE_STATS = 6  # m_r, s_r, s'_r, d_r, owner flag, u_r


def ce_phase1(x: Tensor, target: Tensor, start: int, weight_local: Tensor | None,
              smoothing: bool, ignore_index: int) -> Tensor:
    """The (CE_STATS, N) row statistics of this shard, in the accumulation dtype."""
    acc = accumulation_dtype(x.dtype)
    xa = x.to(acc)
    kernels = phase_kernels(x)
    if kernels == "cpp":
        return torch.ops.linclass._ce_shard_stats(xa, target, start, weight_local, smoothing,
                                                 ignore_index)
    if kernels == "triton":
        return _triton().ce_stats(xa.contiguous(), target.contiguous(), start, weight_local,
                                  smoothing, ignore_index)
    n, width = x.shape
    m = xa.amax(1) if width else xa.new_full((n,), float("-inf"))
    # A shard whose row is all -inf (or holds +inf / NaN) has no finite max to shift by;
    # 0 keeps its e_j exact (0 for -inf) and the merge turns +inf / NaN into a NaN row.
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = xa - shift.unsqueeze(1)  # a new buffer even when xa is x: the scores stay intact
    own, col = _ownership(target, start, width, ignore_index)
    zero = torch.zeros_like(m)
    d = torch.where(own, e.gather(1, col).squeeze(1), zero) if width else zero
    u = zero
    if smoothing and width:
        u = e.sum(1) if weight_local is None else e @ weight_local.to(acc)
    e.exp_()
    if width:
        e.scatter_(1, col, torch.where(own, zero, e.gather(1, col).squeeze(1)).unsqueeze(1))
        s_excl = e.sum(1)  # without the target's term
        s = s_excl + torch.where(own, torch.exp(d), zero)
    else:
        s = s_excl = zero
    return torch.stack([m, s, s_excl, d, own.to(acc), u])


class Merged(NamedTuple):
    """ce_merge's result; the (N,) fields are per row, `rows` takes a block of them."""

    loss: Tensor           # (N,) loss rows (0 where ignored, NaN where the row is)
    target_weight: Tensor  # (N,) w_y, 0 where ignored: the 'mean' divides by its sum
    shift: Tensor          # (N,) this rank's shift m_r (0 where it is not finite)
    exp_coef: Tensor       # (N,) dx_j = exp_coef exp(x_j - shift) - weight_coef w_j
    weight_coef: Tensor    # (N,)   (both 0 on ignored rows, NaN on NaN rows)
    target_grad: Tensor    # (N,) dx_y, written by the rank that holds y

    def rows(self, block: slice) -> "Merged":
        return Merged(*(f[block] for f in self))


def ce_merge(stats: Tensor, target: Tensor, weight: Tensor | None, class_starts: list[int],
             widths: list[int], classes: int, ignore_index: int, label_smoothing: float,
             reduction: str, rank: int, mean_denominator: Tensor | None = None) -> Merged:
    """The global loss rows and phase 2's row coefficients, from the gathered
    (K, CE_STATS, N) statistics of all ranks (the same on every rank).  For a block of
    the rows, mean_denominator is the whole batch's sum of target weights."""
    m, s, s_excl, d, own, u = stats.unbind(1)  # each (K, N)
    acc = stats.dtype
    ignored = target == ignore_index
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    big_m = m.amax(0)  # NaN and +inf propagate: the row is NaN, as in torch
    nan_rows = ~torch.isfinite(big_m) & ~ignored
    big_m = torch.where(torch.isfinite(big_m), big_m, torch.zeros_like(big_m))
    factor = torch.where(s > 0, torch.exp(shift - big_m), torch.zeros_like(s))
    big_s = (s * factor).sum(0)
    big_s_excl = (s_excl * factor).sum(0)
    d_y = (own * (d + shift - big_m)).sum(0)  # x_y - M
    if weight is None:
        w_y = (~ignored).to(acc)
        part_w = torch.tensor(widths, dtype=acc, device=stats.device)
        total_w = float(classes)
    else:
        wa = weight.to(acc)
        w_y = torch.where(ignored, torch.zeros((), dtype=acc, device=wa.device),
                          wa[target.clamp(0, classes - 1)])
        part_w = torch.stack([wa[a:a + b].sum() for a, b in zip(class_starts, widths)])
        total_w = float(wa.sum())
    keep, smooth = 1.0 - label_smoothing, label_smoothing / classes
    log_s = torch.log(big_s)
    loss = keep * w_y * (log_s - d_y)
    if label_smoothing:
        big_u = (u + part_w.unsqueeze(1) * (shift - big_m)).sum(0)
        loss = loss + smooth * (total_w * log_s - big_u)
    nan = torch.full_like(loss, float("nan"))
    zero = torch.zeros_like(loss)
    loss = torch.where(nan_rows, nan, torch.where(ignored, zero, loss))
    if reduction == "mean":
        scale = mean_of(torch.ones((), dtype=acc, device=stats.device),
                        w_y.sum() if mean_denominator is None else mean_denominator)
    else:
        scale = torch.ones((), dtype=acc, device=stats.device)
    exp_coef = scale * (keep * w_y + smooth * total_w) * factor[rank] / big_s
    weight_coef = (scale * smooth).expand_as(loss)
    target_grad = scale * (smooth * (total_w * torch.exp(d_y) / big_s - w_y)
                           - keep * w_y * big_s_excl / big_s)

    def rows(v):  # 0 on ignored rows, NaN on NaN rows
        return torch.where(nan_rows, nan, torch.where(ignored, zero, v)).contiguous()

    return Merged(loss, w_y, shift[rank].contiguous(), rows(exp_coef), rows(weight_coef),
                  rows(target_grad))


def ce_phase2(x: Tensor, target: Tensor, start: int, weight_local: Tensor | None,
              merged: Merged, ignore_index: int, overwrite: bool = False) -> Tensor:
    """This shard's d loss / d scores (accumulation dtype), from the scores and the row
    coefficients of ce_merge; overwrite: into x itself when it is a contiguous
    accumulation-dtype tensor the caller no longer needs."""
    acc = accumulation_dtype(x.dtype)
    xa = x.to(acc)
    in_place = overwrite and x.dtype == acc and x.is_contiguous()
    kernels = phase_kernels(x)
    if kernels == "cpp":
        return torch.ops.linclass._ce_shard_grad(xa, target, start, weight_local, merged.shift,
                                                merged.exp_coef, merged.weight_coef,
                                                merged.target_grad, ignore_index,
                                                x if in_place else None)
    if kernels == "triton":
        return _triton().ce_grad(xa.contiguous(), target.contiguous(), start, weight_local,
                                 merged.shift, merged.exp_coef, merged.weight_coef,
                                 merged.target_grad, ignore_index, x if in_place else None)
    width = x.shape[1]
    g = xa.sub_(merged.shift.unsqueeze(1)) if in_place else xa - merged.shift.unsqueeze(1)
    g = g.exp_().mul_(merged.exp_coef.unsqueeze(1))
    w = torch.ones(width, dtype=acc, device=x.device) if weight_local is None \
        else weight_local.to(acc)
    g.sub_(merged.weight_coef.unsqueeze(1) * w.unsqueeze(0))
    own, col = _ownership(target, start, width, ignore_index)
    if width:
        g.scatter_(1, col, torch.where(own, merged.target_grad,
                                       g.gather(1, col).squeeze(1)).unsqueeze(1))
    # Ignored rows are exactly 0 (even where a +inf score made inf * 0); a row whose
    # exponentials underflow in this shard has zero coefficients too, but not its target's.
    ignored = (merged.exp_coef == 0) & (merged.weight_coef == 0) & (merged.target_grad == 0)
    g.masked_fill_(ignored.unsqueeze(1), 0.0)
    return g


# ---- cross-entropy against class probabilities --------------------------------------

CE_PROBS_STATS = 4  # m_r, s_r, T_r, A_r


def _smoothed_weighted(t: Tensor, weight_local: Tensor | None, label_smoothing: float,
                       classes: int) -> Tensor:
    """w_j t'_j with t' = (1 - eps) t + eps / C (the global C): a new tensor, as torch forms
    it (a -inf score then meets eps / C > 0, not a 0 target, and gives an inf loss)."""
    wt = t * (1.0 - label_smoothing) + label_smoothing / classes if label_smoothing else t.clone()
    if weight_local is not None:
        wt.mul_(weight_local.to(wt.dtype).unsqueeze(0))
    return wt


def _probs_dtype(x: Tensor, t: Tensor) -> torch.dtype:
    """The arithmetic's dtype: the accumulation dtype of the scores and probabilities
    promoted together (float64 if either is), as torch computes mixed inputs."""
    return accumulation_dtype(torch.promote_types(x.dtype, t.dtype))


def ce_probs_phase1(x: Tensor, t: Tensor, weight_local: Tensor | None, label_smoothing: float,
                    classes: int) -> Tensor:
    """The (CE_PROBS_STATS, N) row statistics of this shard against its slice t of the
    target probabilities: m_r = max x_j, s_r = sum exp(x_j - m_r), T_r = sum w_j t'_j,
    A_r = sum w_j t'_j (x_j - m_r)."""
    acc = _probs_dtype(x, t)
    n, width = x.shape
    kernels = phase_kernels(x)
    if kernels == "cpp":
        return torch.ops.linclass._ce_probs_shard_stats(x.to(acc), t.to(acc), weight_local,
                                                        label_smoothing, classes)
    if kernels == "triton":
        return _triton().ce_probs_stats(x.to(acc).contiguous(), t.to(acc).contiguous(),
                                        weight_local, label_smoothing, classes)
    if not width:
        zero = torch.zeros(n, dtype=acc, device=x.device)
        return torch.stack([torch.full_like(zero, float("-inf")), zero, zero, zero])
    xa = x.to(acc)
    m = xa.amax(1)
    # As ce_phase1: a shard with no finite max is shifted by 0 (its -inf scores stay -inf).
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    d = xa - shift.unsqueeze(1)  # a new buffer: the scores stay intact
    wt = _smoothed_weighted(t.to(acc), weight_local, label_smoothing, classes)
    big_t = wt.sum(1)
    a = wt.mul_(d).sum(1)  # 0 * -inf = NaN where a -inf score has target 0, as in torch
    s = d.exp_().sum(1)
    return torch.stack([m, s, big_t, a])


class MergedProbs(NamedTuple):
    """ce_probs_merge's result, per row (N,)."""

    loss: Tensor      # loss rows (NaN where the row is NaN)
    shift: Tensor     # this rank's shift m_r (0 where it is not finite)
    exp_coef: Tensor  # dx_j = exp_coef exp(x_j - shift) - scale w_j t'_j
    scale: float      # the reduction's factor (1 / N for 'mean')


def ce_probs_merge(stats: Tensor, reduction: str, rank: int) -> MergedProbs:
    """The loss rows T log S - A and phase 2's coefficients from the gathered
    (K, CE_PROBS_STATS, N) statistics: M = max_r m_r, S = sum_r s_r exp(m_r - M),
    T = sum_r T_r, A = sum_r A_r + T_r (m_r - M)."""
    m, s, big_t, a = stats.unbind(1)  # each (K, N)
    n = stats.shape[2]
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    big_m = m.amax(0)  # +inf or NaN anywhere (or all -inf): a NaN row, as in torch
    nan_rows = ~torch.isfinite(big_m)
    big_m = torch.where(nan_rows, torch.zeros_like(big_m), big_m)
    factor = torch.where(s > 0, torch.exp(shift - big_m), torch.zeros_like(s))
    big_s = (s * factor).sum(0)
    total_t = big_t.sum(0)
    # A shard with no finite max has T_r (0 - M) added to its A_r of -inf or NaN: unchanged.
    total_a = (a + big_t * (shift - big_m)).sum(0)
    nan = torch.full_like(total_t, float("nan"))
    loss = torch.where(nan_rows, nan, total_t * torch.log(big_s) - total_a)
    scale = (1.0 / n if n else float("nan")) if reduction == "mean" else 1.0
    exp_coef = torch.where(nan_rows, nan, scale * total_t * factor[rank] / big_s)
    return MergedProbs(loss, shift[rank].contiguous(), exp_coef.contiguous(), scale)


def ce_probs_phase2(x: Tensor, t: Tensor, weight_local: Tensor | None, merged: MergedProbs,
                    label_smoothing: float, classes: int) -> Tensor:
    """This shard's d loss / d scores (_probs_dtype): exp_coef exp(x_j - m_r) minus
    scale w_j t'_j (a -inf score gets exactly -scale w_j t'_j, its exponential being 0)."""
    acc = _probs_dtype(x, t)
    kernels = phase_kernels(x)
    if kernels == "cpp":
        return torch.ops.linclass._ce_probs_shard_grad(x.to(acc), t.to(acc), weight_local,
                                                       label_smoothing, classes, merged.shift,
                                                       merged.exp_coef, merged.scale)
    if kernels == "triton":
        return _triton().ce_probs_grad(x.to(acc).contiguous(), t.to(acc).contiguous(),
                                       weight_local, label_smoothing, classes, merged.shift,
                                       merged.exp_coef, merged.scale)
    g = x.to(acc) - merged.shift.unsqueeze(1)
    g = g.exp_().mul_(merged.exp_coef.unsqueeze(1))
    wt = _smoothed_weighted(t.to(acc), weight_local, label_smoothing, classes)
    return g.sub_(wt.mul_(merged.scale))


# ---- multi-margin ------------------------------------------------------------------


def target_scores(x: Tensor, target: Tensor, start: int) -> Tensor:
    """x[i, y_i] where this shard holds class y_i, else 0 (acc dtype, (N,))."""
    acc = accumulation_dtype(x.dtype)
    own, col = _ownership(target, start, x.shape[1], None)
    if x.shape[1] == 0:
        return torch.zeros(x.shape[0], dtype=acc, device=x.device)
    return torch.where(own, x.gather(1, col).squeeze(1).to(acc),
                       torch.zeros((), dtype=acc, device=x.device))


MM_STATS = 2  # l_r, t_r


def mm_phase2(x: Tensor, target: Tensor, start: int, x_y: Tensor, p: int, margin: float,
              weight: Tensor | None, classes: int, reduction: str, rows: int | None = None,
              compute_grad: bool = True) -> tuple[Tensor, Tensor | None]:
    """(stats (MM_STATS, N), this shard's gradient without the target column's term).

    x may be a block of the rows; `rows` is then the global N that 'mean' divides by."""
    acc = x_y.dtype
    n, width = x.shape
    rows = n if rows is None else rows
    v = (torch.ones_like(x_y) if weight is None else weight.to(acc)[target]) / classes
    if reduction == "mean":
        v = v / rows
    xa = x.to(acc)
    kernels = phase_kernels(x)
    if kernels == "cpp":
        stats, grad = torch.ops.linclass._mm_shard_grad(xa, target, start, x_y.contiguous(),
                                                       v.contiguous(), p, margin, compute_grad)
        return stats, grad if compute_grad else None
    if kernels == "triton":
        return _triton().mm_grad(xa.contiguous(), target.contiguous(), start, x_y.contiguous(),
                                 v.contiguous(), p, margin, compute_grad)
    h = margin - x_y.unsqueeze(1) + xa
    own, col = _ownership(target, start, width, None)
    if width:
        h.scatter_(1, col, torch.where(own, torch.full_like(x_y, float("-inf")),
                                       h.gather(1, col).squeeze(1)).unsqueeze(1))
    pos = h.clamp_min(0)
    part_loss = (pos if p == 1 else pos * pos).sum(1)
    grad = (h > 0).to(acc) if p == 1 else 2.0 * pos
    grad.mul_(v.unsqueeze(1))
    return torch.stack([part_loss, grad.sum(1)]), grad if compute_grad else None


def mm_finish(stats: Tensor, grad: Tensor | None, target: Tensor, start: int,
              weight: Tensor | None, classes: int) -> Tensor:
    """The loss rows (N,) from the gathered (K, MM_STATS, N); the target column of grad."""
    acc = stats.dtype
    n = target.shape[0]
    w_y = torch.ones(n, dtype=acc, device=stats.device) if weight is None \
        else weight.to(acc)[target]
    loss = stats[:, 0].sum(0) * w_y / classes
    if grad is None:
        return loss
    own, col = _ownership(target, start, grad.shape[1], None)
    if grad.shape[1]:
        current = grad.gather(1, col).squeeze(1)
        grad.scatter_(1, col, torch.where(own, -stats[:, 1].sum(0), current).unsqueeze(1))
    return loss
