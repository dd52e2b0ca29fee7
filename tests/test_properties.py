"""Property tests of the drop-in contract: random shapes (0-dim to 4-D), strides,
dtypes, every keyword and targets with ignore_index, on every fused backend, against
torch.  A result passes when it equals torch's (float64) or is no further from torch's
float64 result than torch's own result in that dtype (helpers.compare_with_torch):
in low precision torch is not the oracle."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import linclass
from helpers import compare_with_torch

SETTINGS = settings(max_examples=int(__import__("os").environ.get("PROP_EXAMPLES", "150")), deadline=None, derandomize=__import__("os").environ.get("PROP_RANDOM") is None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _layout(draw, t: torch.Tensor) -> torch.Tensor:
    """`t` itself, or the same values read through other strides: a transposed storage
    or every other element of a larger tensor."""
    kind = draw(st.sampled_from(["contiguous", "transposed", "sliced"]))
    if kind == "transposed" and t.dim() >= 2:
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    if kind == "sliced" and t.dim() >= 1:
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


@st.composite
def cross_entropy_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    classes = draw(st.integers(1, 64))
    dims = draw(st.integers(1, 4))
    n = draw(st.integers(0, 6))
    extra = tuple(draw(st.lists(st.integers(1, 3), min_size=max(dims - 2, 0), max_size=max(dims - 2, 0))))
    shape = (classes,) if dims == 1 else (n, classes) + extra
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    scale = draw(st.sampled_from([1.0, 10.0, 100.0]))
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    target_shape = () if dims == 1 else (n,) + extra
    target = torch.randint(0, classes, target_shape, generator=gen)
    ignore_index = draw(st.sampled_from([-100, 0, classes - 1]))
    if target.numel() and draw(st.booleans()):  # some rows ignored
        drop = torch.rand(target_shape, generator=gen) < 0.3
        target = torch.where(drop, torch.full_like(target, ignore_index), target)
    weight = None
    if draw(st.booleans()):
        weight = (torch.rand(classes, generator=gen, dtype=torch.float64) + 0.1).to(dtype)
    kwargs = dict(weight=weight, ignore_index=ignore_index,
                  label_smoothing=draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])),
                  reduction=draw(st.sampled_from(["none", "mean", "sum"])))
    grad_output = None
    if kwargs["reduction"] == "none":
        grad_output = torch.randn(target_shape, generator=gen, dtype=torch.float64).to(dtype)
    return _layout(draw, x), target, kwargs, grad_output


@st.composite
def multi_margin_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    dims = draw(st.integers(0, 2))
    classes = 1 if dims == 0 else draw(st.integers(1, 64))
    n = draw(st.integers(0, 6))
    shape = {0: (), 1: (classes,), 2: (n, classes)}[dims]
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    scale = draw(st.sampled_from([0.1, 1.0, 10.0]))
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    target = torch.randint(0, classes, (n,) if dims == 2 else (), generator=gen)
    weight = None
    if draw(st.booleans()):
        weight = (torch.rand(classes, generator=gen, dtype=torch.float64) + 0.1).to(dtype)
    kwargs = dict(p=draw(st.sampled_from([1, 2])),
                  margin=draw(st.sampled_from([1.0, 0.5, 3.0, 0.0])), weight=weight,
                  reduction=draw(st.sampled_from(["none", "mean", "sum"])))
    grad_output = None
    if kwargs["reduction"] == "none":
        grad_output = torch.randn(target.shape, generator=gen, dtype=torch.float64).to(dtype)
    return _layout(draw, x), target, kwargs, grad_output


def _torch_multi_margin(input, target, **kwargs):
    # torch's CPU multi_margin_loss has no float16 / bfloat16 kernel: it runs in float32
    # and rounds, which is still a fair low-precision reference.
    if input.dtype in (torch.float16, torch.bfloat16):
        w = kwargs.get("weight")
        kwargs = dict(kwargs, weight=None if w is None else w.float())
        return F.multi_margin_loss(input.float(), target, **kwargs).to(input.dtype)
    return F.multi_margin_loss(input, target, **kwargs)


def _extra_rounding(backend, x, grad_output):
    """Roundings the comparison allows beyond torch's, in 16 bits (one unit in the last
    place each): with reduction='none' the saved gradient (for grad_output = 1, rounded
    to the input's dtype) is multiplied by the per-row grad_output and rounded again;
    and the Triton interpreter converts float32 to bfloat16 by truncation
    (triton/runtime/interpreter.py: cast_impl passes no rounding mode), where a GPU
    rounds to nearest."""
    if x.dtype not in (torch.bfloat16, torch.float16):
        return 0.0
    extra = (grad_output is not None) + (backend == "triton" and x.dtype == torch.bfloat16)
    return extra * torch.finfo(x.dtype).eps


@SETTINGS
@given(case=cross_entropy_cases())
def test_cross_entropy_matches_torch(kernel_backend, case):
    x, target, kwargs, grad_output = case
    compare_with_torch(linclass.cross_entropy, F.cross_entropy, x, target,
                       grad_output=grad_output, extra_rtol=_extra_rounding(kernel_backend, x, grad_output),
                       **kwargs)


@SETTINGS
@given(case=multi_margin_cases())
def test_multi_margin_loss_matches_torch(kernel_backend, case):
    x, target, kwargs, grad_output = case
    if target.numel() == 0 and kwargs["reduction"] == "mean":
        # torch returns uninitialized memory for the mean of no rows; ours is 0 / 0.
        assert linclass.multi_margin_loss(x, target, **kwargs).isnan().item()
        return
    if target.numel() == 0 and kwargs["reduction"] == "sum":
        # ... and for their sum (torch 2.14: e.g. -1.5e28 or NaN); ours is 0.
        assert linclass.multi_margin_loss(x, target, **kwargs).item() == 0.0
        return
    compare_with_torch(linclass.multi_margin_loss, _torch_multi_margin, x, target,
                       grad_output=grad_output, extra_rtol=_extra_rounding(kernel_backend, x, grad_output),
                       **kwargs)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_multi_margin_loss_of_a_0dim_input(kernel_backend, reduction):
    # torch reads a 0-dim input as one class: the loss and its gradient are 0.
    x = torch.tensor(0.7, requires_grad=True)
    loss = linclass.multi_margin_loss(x, torch.tensor(0), reduction=reduction)
    ref = F.multi_margin_loss(x.detach(), torch.tensor(0), reduction=reduction)
    assert loss.shape == ref.shape == () and loss.item() == ref.item() == 0.0
    loss.backward()
    assert x.grad.shape == () and x.grad.item() == 0.0
    with pytest.raises(RuntimeError, match="out of"):
        linclass.multi_margin_loss(x, torch.tensor(1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cross_entropy_mean_with_ignored_rows_rounds_once(kernel_backend, dtype):
    # Found by the property test: the C++ lane path (C <= 48) used to divide a 16-bit
    # 'mean' by all rows and correct the rounded gradient for the ignored ones afterwards.
    x = (torch.randn(64, 23, dtype=torch.float64) * 2).to(dtype)
    target = torch.randint(0, 23, (64,))
    target[::3] = 22
    compare_with_torch(linclass.cross_entropy, F.cross_entropy, x, target, ignore_index=22,
                       extra_rtol=_extra_rounding(kernel_backend, x, None))
