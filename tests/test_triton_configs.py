"""The Triton cross-entropy's launch configurations (kernels/tuning.py) give the same
results: the row-walking kernel with a reversed gradient pass and L2 eviction hints
(candidates of bench/tune_gpu.py) equals the plain one bitwise and torch closely.

Runs on the GPU when there is one (bench/gpu_check.sh), else on CPU tensors in Triton's
interpreter mode (tests/conftest.py), with few rows; bench/tune_gpu.py times the same
configurations."""

import pytest
import torch
import torch.nn.functional as F

import linclass

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not linclass.backends.runs_on("triton", DEVICE),
                                reason=f"the Triton backend does not run on {DEVICE} here")

# (BLOCK_C, num_warps[, reverse, evict])
WALKS = [(256, 4, True), (256, 4, False, True), (256, 4, True, True), (128, 4, True, True)]


def _run(x, t, config, weight=None, ignore_index=-100, smoothing=0.0):
    from linclass.kernels import cross_entropy as ce

    const = ce.consts(t, weight, ignore_index, x.shape[1], torch.float32, True)
    grad = torch.full_like(x, float("nan"))
    loss = ce.launch(x, grad, t, weight, ignore_index, smoothing, const, config=config)
    return loss, grad


@pytest.mark.parametrize("config", WALKS, ids=str)
@pytest.mark.parametrize("keywords", ["plain", "weight+smoothing+ignore"])
def test_walk_options_equal_the_plain_walk(config, keywords):
    n, c = 7, 1100  # C > TILE_MAX_C: 5 to 9 column blocks per row
    x = torch.randn(n, c, device=DEVICE) * 3
    t = torch.randint(0, c, (n,), device=DEVICE)
    kw = {}
    if keywords != "plain":
        t[2] = -1  # ignored
        t[5] = c + 4  # out of range: a NaN row, no out-of-bounds access
        kw = dict(weight=torch.rand(c, device=DEVICE) + 0.5, ignore_index=-1, smoothing=0.1)
    plain_loss, plain_grad = _run(x, t, config[:2], **kw)
    loss, grad = _run(x, t, config, **kw)
    assert torch.equal(loss.isnan(), plain_loss.isnan())
    assert torch.equal(loss.nan_to_num(), plain_loss.nan_to_num())
    assert torch.equal(grad.nan_to_num(), plain_grad.nan_to_num())
    ok = torch.ones(n, dtype=torch.bool, device=DEVICE)
    if keywords != "plain":
        ok[5] = False
        assert loss[5].isnan() and grad[5].isnan().all()
    assert not grad[ok].isnan().any()

    # and the plain walk is torch's cross-entropy (per-row losses; the gradient is
    # scaled for 'mean')
    xr = x[ok].clone().requires_grad_()
    torch_kw = dict(weight=kw.get("weight"), ignore_index=kw.get("ignore_index", -100),
                    label_smoothing=kw.get("smoothing", 0.0))
    ref = F.cross_entropy(xr, t[ok], reduction="sum", **torch_kw)
    ref.backward()
    # the consts are those of all rows; the NaN row's weight counts as 0 there
    denom = (kw["weight"][t[ok].clamp(0, c - 1)] * (t[ok] != -1)).sum() if kw else ok.sum()
    torch.testing.assert_close(loss[ok].sum(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad[ok], xr.grad / denom, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weighted", [False, True])
def test_consts_over_many_programs(dtype, weighted):
    # consts() splits the targets (and the weights) over many programs; the last one to
    # finish sums their partials: against a float64 sum, and bitwise the same twice.
    from linclass.kernels import cross_entropy as ce

    n, c = 50003, (70001 if weighted else 7)
    t = torch.randint(0, c, (n,), device=DEVICE)
    t[::5] = 3  # ignored
    w = torch.rand(c, device=DEVICE, dtype=dtype) + 0.5 if weighted else None
    out = ce.consts(t, w, 3, c, dtype, True)
    keep = t != 3
    denom = w.double()[t[keep]].sum() if weighted else keep.sum().double()
    total = w.double().sum() if weighted else torch.tensor(float(c), dtype=torch.float64)
    got = out[:3].double().cpu()
    want = torch.stack([(1 / denom).cpu(), total.cpu(), denom.cpu()])
    torch.testing.assert_close(got, want, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)
    assert torch.equal(ce.consts(t, w, 3, c, dtype, True)[:3], out[:3])
