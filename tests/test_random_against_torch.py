"""Seeded random cases against torch's float64 result: both ops (and, below, the fused
linear ops), every keyword, the four float dtypes, class counts and layouts no other
test names (strided, transposed, channels-last, stride-0 rows, strided targets), NaN/inf
scores, forced backends and the automatic choice.  A longer run of the same generator
found the empty-input bugs that tests in test_cross_entropy.py / test_multi_margin.py /
test_linear_loss.py now pin; this short one guards the space between the named shapes.
Every case is also evaluated under torch.no_grad (the kernels' forward-only paths)."""

import contextlib
import random

import pytest
import torch
import torch.nn.functional as F

import linclass
from conftest import KERNEL_BACKENDS

# Of the largest value (at least 1): rounding of the result and of the input's own dtype.
TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 8e-2}
CLASSES = [1, 2, 3, 5, 10, 16, 17, 31, 32, 33, 63, 64, 65, 100, 127, 128, 129, 255, 256, 257,
           1000, 1025, 4099]


def _scores(rng, shape, dtype):
    x = torch.randn(shape, dtype=torch.float64)
    kind = rng.choice(["normal", "big", "tiny", "confident", "ties", "non-finite"])
    if kind == "big":
        x *= rng.choice([30, 1e3])
    elif kind == "tiny":
        x *= 1e-6
    elif kind == "ties":
        x = torch.round(x)
    elif kind == "confident" and x.dim() >= 2:
        x[:, 0] += 40
    elif kind == "non-finite" and x.numel():
        x.view(-1)[rng.randrange(x.numel())] = rng.choice([float("inf"), -float("inf"), float("nan")])
    return x.to(dtype)


def _layout(rng, x):
    """The same values in another memory layout (a view)."""
    r = rng.random()
    if x.dim() >= 3 and r < 0.3:  # classes innermost in memory
        perm = [0, *range(2, x.dim()), 1]
        return x.permute(*perm).contiguous().permute(*[perm.index(i) for i in range(x.dim())])
    if x.dim() == 2 and x.shape[0] > 1 and r < 0.1:  # every row the same: stride 0
        return x[:1].expand_as(x)
    if x.dim() >= 2 and r < 0.4:
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if r < 0.6:
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1] + 1, dtype=x.dtype)
        wide[..., 1::2] = x
        return wide[..., 1::2]
    return x


def _case(rng):
    op = rng.choice(["cross_entropy", "multi_margin_loss"])
    dtype = rng.choice([torch.float32, torch.float32, torch.float64, torch.float16, torch.bfloat16])
    C = rng.choice(CLASSES)
    N = min(rng.choice([0, 1, 2, 3, 7, 16, 17, 64, 100, 257]), max(1, 40000 // C))
    shape = (N, C)
    if op == "cross_entropy" and rng.random() < 0.2:
        shape = (N, C, rng.choice([1, 2, 3]), rng.choice([1, 4]))
    elif rng.random() < 0.1:
        shape = (C,)
    x = _layout(rng, _scores(rng, shape, dtype))
    t_shape = () if len(shape) == 1 else (shape[0], *shape[2:])
    t = torch.randint(0, C, t_shape)
    if t.dim() == 1 and t.numel() and rng.random() < 0.2:  # a strided target
        t = torch.stack([t, t], 1)[:, 0]
    kw = {"reduction": rng.choice(["mean", "sum", "none"])}
    if rng.random() < 0.3:
        kw["weight"] = (torch.rand(C, dtype=torch.float64) * 2).to(dtype)
    t = _loss_options(rng, op == "cross_entropy", t, C, kw)
    if op == "cross_entropy" and "ignore_index" not in kw and rng.random() < 0.25:
        t = _layout(rng, _probabilities(rng, shape, dtype))
    return op, x, t, kw


def _probabilities(rng, shape, dtype):
    """A probability target of the scores' shape (class dim 1, or 0 for 1-D scores):
    soft labels, one-hot rows, or any reals (torch takes them too)."""
    class_dim = 1 if len(shape) > 1 else 0
    kind = rng.choice(["soft", "onehot", "any"])
    t = torch.randn(shape, dtype=torch.float64)
    if kind == "soft":
        t = torch.softmax(t * 3, class_dim)
    elif kind == "onehot":
        t = (t == t.amax(class_dim, keepdim=True)).double()
    return t.to(dtype)


def _loss_options(rng, cross_entropy: bool, t, C, kw):
    """Adds the loss's own keywords to kw; returns the targets (some set to ignore_index)."""
    if cross_entropy:
        if rng.random() < 0.4:
            kw["ignore_index"] = rng.choice([-100, 0, C - 1])
            t = torch.where(torch.rand(t.shape) < 0.3, torch.full_like(t, kw["ignore_index"]), t)
        if rng.random() < 0.3:
            kw["label_smoothing"] = rng.choice([0.05, 0.5, 1.0])
    else:
        kw.update(p=rng.choice([1, 2]), margin=rng.choice([1.0, 0.0, 0.5, -1.0, 3.0]))
    return t


def _close(ours, best, dtype, what):
    ours, best = ours.double(), best.double()
    assert ours.shape == best.shape, what
    assert torch.equal(ours.isnan(), best.isnan()), f"{what}: NaN where torch has none or back"
    ok = ~best.isnan()
    ours, best = ours[ok], best[ok]
    if dtype in (torch.float16, torch.bfloat16):  # float64 beyond the dtype's range: inf
        beyond = best.abs() > torch.finfo(dtype).max
        best = torch.where(beyond & ours.isinf(), ours, best)
    assert torch.equal(ours.isinf(), best.isinf()), f"{what}: inf pattern"
    finite = ~best.isinf()
    if finite.any():
        err = (ours[finite] - best[finite]).abs().max().item()
        scale = max(best[finite].abs().max().item(), 1.0)
        assert err <= TOL[dtype] * scale, f"{what}: error {err:.3g} at scale {scale:.3g}"


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("backend", ["auto", *KERNEL_BACKENDS])
def test_random_cases_match_torch_in_float64(backend, seed):
    # "auto": the automatic choice, which also routes (small CPU hinge losses to torch).
    rng = random.Random(seed)
    torch.manual_seed(seed)
    with contextlib.nullcontext() if backend == "auto" else linclass.backends.use(backend):
        for _ in range(25):
            _check_case(backend, *_case(rng))


def _check_case(backend, op, x, t, kw):
    if backend == "triton" and x.numel() > 3000:
        return  # the Triton interpreter: ~1 ms per program
    ref_kw = dict(kw, weight=kw["weight"].double()) if "weight" in kw else kw
    xr = x.detach().double().requires_grad_()
    best = getattr(F, op)(xr, t.double() if t.is_floating_point() else t, **ref_kw)
    xl = x.detach().requires_grad_()
    ours = getattr(linclass, op)(xl, t, **kw)
    with torch.no_grad():  # evaluation: the kernels' forward-only paths
        evaluation = getattr(linclass, op)(x.detach(), t, **kw)
    g = torch.randn(best.shape, dtype=torch.float64)
    if best.numel():
        (best * g).sum().backward()
        (ours.double() * g).sum().backward()
    what = f"{op} {x.dtype} {tuple(x.shape)} {kw}"
    on_torch = (linclass.backends.cpu_cross_entropy_on_torch if op == "cross_entropy"
                else linclass.backends.cpu_hinge_on_torch)
    if backend == "auto" and on_torch(x) and not t.is_floating_point():  # routed to torch's
        # own kernel (class indices only): its result, bitwise
        xt = x.detach().requires_grad_()
        theirs = getattr(F, op)(xt, t, **kw)
        if theirs.numel():
            (theirs.double() * g).sum().backward()
        if x.numel():  # (no rows: torch's hinge returns uninitialized memory)
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True, msg=what)
            torch.testing.assert_close(evaluation, theirs.detach(), rtol=0, atol=0, equal_nan=True, msg=what)
            torch.testing.assert_close(xl.grad, xt.grad, rtol=0, atol=0, equal_nan=True, msg=what)
        return
    if op == "multi_margin_loss" and x.numel() == 0 and kw["reduction"] != "none":
        best = torch.tensor(float("nan") if kw["reduction"] == "mean" else 0.0)  # torch:
        # uninitialized memory over no rows
    _close(ours.detach(), best.detach(), x.dtype, what + " loss")
    _close(evaluation, best.detach(), x.dtype, what + " evaluation loss")
    if best.numel() and xr.grad is not None:
        ref = xr.grad
        if op == "cross_entropy" and not t.is_floating_point():  # ignored rows get 0
            # here, NaN in torch (README)
            ignored = t == kw.get("ignore_index", -100)
            ref = torch.where(ignored.unsqueeze(1) if x.dim() > 1 else ignored, 0.0, ref)
        if op == "multi_margin_loss":
            ref = _kink_rows_as_ours(x, t, kw, ref, xl.grad)
        _close(xl.grad, ref, x.dtype, what + " grad")


def _kink_rows_as_ours(x, t, kw, ref, ours):
    """The hinge's gradient jumps where margin - x_y + x_j crosses 0: a row with a term
    within the dtype's rounding of that kink may switch it in either dtype (torch's own
    float32 kernel switches as linclass does), so such rows are taken as computed."""
    rows = x.detach().double().reshape(-1, x.shape[-1]) if x.dim() else x.detach().double().reshape(1, 1)
    target = t.reshape(-1, 1)
    terms = kw.get("margin", 1.0) - rows.gather(1, target) + rows
    limit = TOL[x.dtype] * rows.abs().amax(1, keepdim=True).clamp(min=1.0)
    near = (terms.abs() <= limit).scatter_(1, target, False).any(1)
    if not near.any():
        return ref
    ref, ours = ref.reshape(rows.shape).clone(), ours.double().reshape(rows.shape)
    ref[near] = ours[near]
    return ref.reshape(x.shape)


def _linear_case(rng):
    op = rng.choice(["linear_cross_entropy", "linear_multi_margin_loss"])
    dtype = rng.choice([torch.float32, torch.float32, torch.float64, torch.float16, torch.bfloat16])
    C = rng.choice([1, 2, 3, 10, 16, 31, 33, 100, 257, 1000])
    D = rng.choice([1, 3, 8, 16, 33, 64, 200])
    N = min(rng.choice([0, 1, 2, 5, 17, 64, 100, 300]), max(1, 40000 // C))
    x = _layout(rng, (torch.randn(N, D, dtype=torch.float64) * rng.choice([0.1, 1.0, 3.0])).to(dtype))
    w = _layout(rng, (torch.randn(C, D, dtype=torch.float64) / max(D, 1) ** 0.5).to(dtype))
    b = torch.randn(C, dtype=torch.float64).to(dtype) if rng.random() < 0.5 else None
    t = torch.randint(0, C, (N,))
    kw = {"reduction": rng.choice(["mean", "sum", "none"])}
    t = _loss_options(rng, op == "linear_cross_entropy", t, C, kw)
    return op, x, w, b, t, kw


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("backend", ["auto", *KERNEL_BACKENDS])
def test_random_linear_cases_match_torch_in_float64(backend, seed):
    """The fused linear ops against F.linear + loss in float64: loss and the input, weight
    and bias gradients, in every dtype, layout and keyword (the products round in the
    input dtype, so 16-bit tolerances grow with sqrt(D))."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    with contextlib.nullcontext() if backend == "auto" else linclass.backends.use(backend):
        for _ in range(20):
            op, x, w, b, t, kw = _linear_case(rng)
            if backend == "triton" and x.shape[0] * w.shape[0] > 3000:
                continue  # the Triton interpreter: ~1 ms per program
            loss_fn = F.cross_entropy if op == "linear_cross_entropy" else F.multi_margin_loss
            ours_in = [v.detach().requires_grad_() if v is not None else None for v in (x, w, b)]
            ref_in = [v.detach().double().requires_grad_() if v is not None else None for v in (x, w, b)]
            ours = getattr(linclass, op)(ours_in[0], ours_in[1], t, ours_in[2], **kw)
            best = loss_fn(F.linear(*ref_in), t, **kw)
            what = f"{op} {x.dtype} N={x.shape[0]} D={x.shape[1]} C={w.shape[0]} {kw}"
            if op == "linear_multi_margin_loss" and t.numel() == 0 and kw["reduction"] != "none":
                # torch's hinge over no rows returns uninitialized memory
                best = torch.tensor(float("nan") if kw["reduction"] == "mean" else 0.0, dtype=torch.float64)
            widen = max(x.shape[1], 1) ** 0.5 if x.dtype in (torch.float16, torch.bfloat16) else 1.0
            _close_scaled(ours.detach(), best.detach(), x.dtype, widen, what + " loss")
            with torch.no_grad():  # evaluation: no gradient products
                evaluation = getattr(linclass, op)(x, w, t, b, **kw)
            _close_scaled(evaluation, best.detach(), x.dtype, widen, what + " evaluation loss")
            if not t.numel():
                continue  # no rows: test_linear_loss.py pins the empty gradients
            g = torch.randn(best.shape, dtype=torch.float64)
            present = [i for i in range(3) if ours_in[i] is not None]
            mine = torch.autograd.grad((ours.double() * g).sum(), [ours_in[i] for i in present])
            reference = torch.autograd.grad((best * g).sum(), [ref_in[i] for i in present])
            torch_own = _torch_in_dtype(loss_fn, x, w, b, t, kw, g, present)
            for i, a, r, o in zip(present, mine, reference, torch_own):
                _close_scaled(a, r, x.dtype, widen, f"{what} grad {('input', 'weight', 'bias')[i]}", o)


def _torch_in_dtype(loss_fn, x, w, b, t, kw, g, present):
    """torch's own gradients in the input dtype (F.linear there; the hinge, which torch
    has no 16-bit CPU kernel for, on float32 copies of the 16-bit scores)."""
    ins = [v.detach().requires_grad_() if v is not None else None for v in (x, w, b)]
    s = F.linear(*ins)
    if loss_fn is F.multi_margin_loss and s.dtype in (torch.float16, torch.bfloat16):
        s = s.float()
    loss = loss_fn(s, t, **kw)
    return torch.autograd.grad((loss.double() * g).sum(), [ins[i] for i in present])


def _close_scaled(ours, best, dtype, widen, what, torch_own=None):
    """ours within the dtype's tolerance of the float64 result; with torch_own (torch's
    result in the same dtype), elementwise also within twice torch's own error: where
    the hinge's gradient jumps (a term at its kink, which rounding in the dtype decides
    for torch and for us alike) or where a 16-bit gradient cancels, the float64 result
    is out of reach of both."""
    ours, best = ours.double(), best.double()
    assert ours.shape == best.shape, what
    assert torch.equal(ours.isnan(), best.isnan()), f"{what}: NaN pattern"
    ok = ~best.isnan()
    if ok.any():
        scale = max(best[ok].abs().max().item(), 1.0)
        err = (ours[ok] - best[ok]).abs()
        allowed = torch.full_like(err, TOL[dtype] * widen * scale)
        if torch_own is not None:
            allowed = allowed + 2 * (torch_own.double()[ok] - best[ok]).abs().nan_to_num(0.0)
        worst = (err - allowed).argmax()
        assert err[worst] <= allowed[worst], (f"{what}: error {err[worst].item():.3g} at scale "
                                              f"{scale:.3g} (allowed {allowed[worst].item():.3g})")
