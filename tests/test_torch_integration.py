"""The fused ops are first-class torch ops: opcheck, torch.compile, nn modules."""

import pytest
import torch
import torch.nn.functional as F

import linclass
from helpers import assert_close, leaf


def ce_samples():
    x = torch.randn(6, 5, requires_grad=True)
    t = torch.randint(0, 5, (6,))
    yield (x, t, None, -100, 0.0, 1, True)
    yield (x, t, torch.rand(5), 2, 0.1, 0, True)
    yield (torch.randn(3, 4, 2, 3, requires_grad=True), torch.randint(0, 4, (3, 2, 3)), None, -100, 0.2, 2, True)
    yield (torch.randn(2, 700, dtype=torch.float64, requires_grad=True), torch.tensor([3, 699]), None, -100, 0.0, 1, True)
    yield (torch.randn(7), torch.tensor(3), None, -100, 0.0, 0, False)
    # Layouts whose gradient the CPU kernel makes in the input's strides (the fake kernel
    # must say so): column-major, channels-last, (B, V, T) from (B, T, V), and a dense
    # permutation whose d-dims do not flatten.
    yield (torch.randn(5, 9).t().requires_grad_(), torch.randint(0, 5, (9,)), None, -100, 0.0, 1, True)
    yield (torch.randn(2, 6, 3, 4).to(memory_format=torch.channels_last).requires_grad_(),
           torch.randint(0, 6, (2, 3, 4)), None, -100, 0.1, 0, True)
    yield (torch.randn(2, 5, 40).transpose(1, 2).requires_grad_(), torch.randint(0, 40, (2, 5)),
           None, 1, 0.0, 2, True)
    yield (torch.randn(2, 7, 4, 3).transpose(2, 3).requires_grad_(), torch.randint(0, 7, (2, 3, 4)),
           None, -100, 0.0, 1, True)


def mm_samples():
    x = torch.randn(6, 5, requires_grad=True)
    t = torch.randint(0, 5, (6,))
    yield (x, t, 1, 1.0, None, 1, True)
    yield (x, t, 2, 0.5, torch.rand(5), 0, True)
    yield (torch.randn(3, 900, dtype=torch.float64, requires_grad=True), torch.tensor([0, 5, 899]), 1, 1.0, None, 2, True)
    yield (torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), 1, 1.0, None, 1, False)
    yield (torch.randn(6, 8).t().requires_grad_(), torch.randint(0, 6, (8,)), 1, 1.0, None, 1, True)


def _ops(name):
    """The registered op of every fused CPU backend: C++ (cpp) and, in interpreter
    mode, Triton."""
    ops = [getattr(torch.ops.linclass, name).default]
    if linclass.backends.runs_on("triton", "cpu"):
        ops.append(getattr(torch.ops.linclass, f"{name}_triton").default)
    return ops


@pytest.mark.parametrize("op", _ops("cross_entropy"), ids=str)
@pytest.mark.parametrize("args", list(ce_samples()))
def test_opcheck_cross_entropy(op, args):
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("op", _ops("multi_margin_loss"), ids=str)
@pytest.mark.parametrize("args", list(mm_samples()))
def test_opcheck_multi_margin_loss(op, args):
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_compile_fullgraph_forward_backward(kernel_backend, backend):
    def step(x, t, w):
        return (linclass.cross_entropy(x, t, weight=w, label_smoothing=0.1)
                + linclass.multi_margin_loss(x, t, p=2) * 3)

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    x = torch.randn(16, 10)
    t = torch.randint(0, 10, (16,))
    w = torch.rand(10)
    xa, xb = leaf(x), leaf(x)
    la = compiled(xa, t, w)
    la.backward()
    lb = step(xb, t, w)
    lb.backward()
    assert_close(la.detach(), lb.detach(), torch.float32)
    assert_close(xa.grad, xb.grad, torch.float32)


@pytest.mark.parametrize("grad_output", [1.0, 2.5, 0.0])
def test_compiled_backward_scales_the_saved_gradient_in_place(kernel_backend, grad_output):
    # AOTAutograd would otherwise multiply the saved N x C gradient by grad_output into a
    # new tensor (one more pass over it); the backward graph holds the in-place op.
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    recorder = AotEagerAndRecordGraphs()
    compiled = torch.compile(lambda x, t: linclass.cross_entropy(x, t) * grad_output,
                             fullgraph=True, backend=recorder)
    x, t = torch.randn(64, 33), torch.randint(0, 33, (64,))
    xa, xb = leaf(x), leaf(x)
    compiled(xa, t).backward()
    (linclass.cross_entropy(xb, t) * grad_output).backward()
    assert_close(xa.grad, xb.grad, torch.float32)
    if not hasattr(torch.compiler, "_compile_session_context"):
        return  # torch 2.11 traces the backward as eager code: a multiply (_ops._rescale)
    (backward,) = recorder.bw_graphs
    assert "linclass.scale_saved_grad_" in backward.code
    for node in backward.graph.nodes:  # a multiply of grad_output itself is fine
        if node.op == "call_function" and "mul" in str(node.target):
            assert node.meta["val"].numel() == 1, node.format_node()


def test_compiled_backward_twice_without_donated_buffers(kernel_backend):
    # With donated buffers off, retain_graph=True is allowed: the first backward must not
    # have scaled the saved gradient the second one reads.
    torch._dynamo.reset()
    with torch._functorch.config.patch(donated_buffer=False):
        compiled = torch.compile(lambda x, t: linclass.multi_margin_loss(x, t) * 3.0,
                                 fullgraph=True)
        x, t = torch.randn(40, 7), torch.randint(0, 7, (40,))
        xa, xb = leaf(x), leaf(x)
        loss = compiled(xa, t)
        loss.backward(retain_graph=True)
        loss.backward()
    (F.multi_margin_loss(xb, t) * 3.0).backward()
    assert_close(xa.grad, 2 * xb.grad, torch.float32)
    torch._dynamo.reset()


@pytest.mark.parametrize("grad_output", [1.0, -0.5])
def test_opcheck_scale_saved_grad(grad_output):
    g = torch.randn(5, 7)
    torch.library.opcheck(torch.ops.linclass.scale_saved_grad_.default,
                          (g, torch.tensor(grad_output)))
    before = g.clone()
    torch.ops.linclass.scale_saved_grad_(g, torch.tensor(grad_output))
    assert torch.equal(g, before * grad_output)


def test_compile_fullgraph_kdim_none_reduction(kernel_backend):
    def f(x, t):
        return linclass.cross_entropy(x, t, reduction="none").square().mean()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 5, 3, 4)
    t = torch.randint(0, 5, (2, 3, 4))
    xa, xb = leaf(x), leaf(x)
    compiled(xa, t).backward()
    f(xb, t).backward()
    assert_close(xa.grad, xb.grad, torch.float32)


def test_nn_modules_are_torch_modules(kernel_backend):
    w = torch.rand(7)
    ours = linclass.nn.CrossEntropyLoss(weight=w, ignore_index=2, label_smoothing=0.1)
    theirs = torch.nn.CrossEntropyLoss(weight=w, ignore_index=2, label_smoothing=0.1)
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x, t = torch.randn(9, 7), torch.randint(0, 7, (9,))
    assert_close(ours(x, t), theirs(x, t), torch.float32)
    ours = linclass.nn.MultiMarginLoss(p=2, margin=0.5, weight=w, reduction="sum")
    theirs = torch.nn.MultiMarginLoss(p=2, margin=0.5, weight=w, reduction="sum")
    assert_close(ours(x, t), theirs(x, t), torch.float32)


def test_drop_in_inside_a_model(kernel_backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
    x, t = torch.randn(64, 12), torch.randint(0, 5, (64,))
    grads = []
    for loss_fn in (F.cross_entropy, linclass.cross_entropy):
        model.zero_grad()
        loss_fn(model(x), t).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert_close(b, a, torch.float32)


def test_the_loss_node_feeds_the_input_directly(kernel_backend):
    """The fused loss is one graph node whose gradient goes straight to the (N, C) input:
    no reshape or view node in between (each one is host time in every backward)."""
    x, t = torch.randn(9, 7, requires_grad=True), torch.randint(0, 7, (9,))
    for fn in (linclass.cross_entropy, linclass.multi_margin_loss):
        for reduction in ("mean", "none"):
            loss = fn(x, t, reduction=reduction)
            nodes = [type(f).__name__ for f, _ in loss.grad_fn.next_functions if f is not None]
            assert nodes == ["AccumulateGrad"], (fn.__name__, reduction, nodes)


def _kinds_of_cpu_tensors():
    """(name, tensor, whether an op on it reaches the CPU kernel through only the
    autograd keys)."""
    from torch.testing._internal.two_tensor import TwoTensor

    x = torch.randn(5, 4)
    with torch.inference_mode():
        inference = torch.randn(5, 4)
    yield "plain", x, True
    yield "requires_grad", torch.randn(5, 4, requires_grad=True), True
    yield "transposed", torch.randn(4, 5).t(), True
    yield "inference", inference, True
    yield "parameter", torch.nn.Parameter(torch.randn(5, 4)), True
    yield "negated view", torch._neg_view(x), False
    yield "zero tensor", torch._efficientzerotensor((5, 4)), False
    yield "nested", torch.nested.nested_tensor([torch.randn(2, 4), torch.randn(3, 4)]), False
    yield "sparse", x.to_sparse(), False
    yield "meta", torch.randn(5, 4, device="meta"), False
    yield "subclass with __torch_dispatch__", TwoTensor(x, x.clone()), False


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.skipif(not linclass.backends.runs_on("cpp", "cpu"), reason="C++ CPU kernels not built")
def test_plain_cpu_test_agrees_with_the_dispatch_keys():
    """The cheap test that lets an eager call skip the dispatcher says yes exactly for the
    tensors whose dispatch keys are the plain CPU ones (and no mode or functorch
    transform is active)."""
    from linclass import _ops

    plain_keys = {"CPU", "ADInplaceOrView", "AutogradCPU", "AutocastCPU"}
    for name, x, expected in _kinds_of_cpu_tensors():
        keys = set(str(torch._C._dispatch_keys(x))[len("DispatchKeySet("):-1].split(", "))
        assert (keys <= plain_keys and "CPU" in keys) == expected, (name, keys)
        assert _ops.is_plain_cpu(x) == expected, name
    x = torch.randn(5, 4)
    with torch.utils._python_dispatch.TorchDispatchMode():
        assert not _ops.is_plain_cpu(x)
    torch.vmap(lambda row: _check_not_plain(row))(x)
    torch.func.grad(lambda v: _check_not_plain(v).sum())(x)


def _check_not_plain(x):
    from linclass import _ops

    assert not _ops.is_plain_cpu(x)
    return x


@pytest.mark.skipif(not linclass.backends.runs_on("cpp", "cpu"), reason="C++ CPU kernels not built")
def test_eager_calls_on_special_tensors_take_the_full_dispatch():
    """A negated view and a dispatch mode must not be skipped by the eager fast path: the
    first would hand the kernel un-negated memory, the second would not see the op."""
    x, t = torch.randn(6, 5), torch.randint(0, 5, (6,))
    for fn, ref in ((linclass.cross_entropy, F.cross_entropy),
                    (linclass.multi_margin_loss, F.multi_margin_loss)):
        with linclass.backends.use("cpp"):
            assert_close(fn(torch._neg_view(x), t), ref(-x, t), torch.float32)

    seen = []

    class Recorder(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Recorder(), linclass.backends.use("cpp"):
        linclass.cross_entropy(x, t)
    assert "linclass.cross_entropy.default" in seen, seen


@pytest.mark.skipif(not linclass.backends.runs_on("cpp", "cpu"), reason="C++ CPU kernels not built")
def test_op_called_without_its_gradient_refuses_backward():
    """torch.ops.linclass.cross_entropy with compute_grad=False saves no gradient: a
    backward through it must say so, not hand back an empty tensor."""
    x, t = torch.randn(3, 4, requires_grad=True), torch.randint(0, 4, (3,))
    loss, _ = torch.ops.linclass.cross_entropy(x, t, None, -100, 0.0, 1, False)
    with pytest.raises(RuntimeError, match="compute_grad=False"):
        loss.backward()
    loss, _ = torch.ops.linclass.cross_entropy(x, t, None, -100, 0.0, 1, True)
    loss.backward()
    assert_close(x.grad, torch.autograd.grad(F.cross_entropy(x, t), x)[0], torch.float32)


@pytest.mark.parametrize("op", ["cross_entropy", "multi_margin_loss"])
@pytest.mark.parametrize("classes", [5, 50, 150, 513, 4099])
def test_column_major_scores(kernel_backend, op, classes):
    """x.t() of a (C, N) tensor: the loss and gradient of torch, every option; the C++
    kernels write the gradient in the input's layout (else autograd copies it there)."""
    n = 37
    options = ([dict(), dict(label_smoothing=0.1, ignore_index=1), dict(reduction="none")]
               if op == "cross_entropy" else [dict(), dict(p=2, margin=0.5), dict(reduction="none")])
    for kwargs in options:
        base = torch.randn(classes, n, dtype=torch.float64)
        target = torch.randint(0, classes, (n,))
        weight = torch.rand(classes, dtype=torch.float64)
        x = base.t().requires_grad_()
        loss = getattr(linclass, op)(x, target, weight=weight, **kwargs)
        loss.sum().backward()
        ref_x = base.t().requires_grad_()
        ref = getattr(F, op)(ref_x, target, weight=weight, **kwargs)
        ref.sum().backward()
        torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-10, atol=1e-12)
    if kernel_backend == "cpp":
        args = (None, -100, 0.0, 1, True) if op == "cross_entropy" else (1, 1.0, None, 1, True)
        grad = getattr(torch.ops.linclass, op)(x.detach(), target, *args)[1]
        assert grad.stride() == x.stride()


def _dense_layouts(classes):
    """(name, make(dtype) -> leaf scores, target shape) of dense inputs in layouts other
    than row-major: their gradient is expected in the same strides."""
    yield "channels_last", (lambda dt: torch.randn(3, classes, 5, 4, dtype=dt)
                            .to(memory_format=torch.channels_last)), (3, 5, 4)
    yield "logits.transpose(1, 2)", (lambda dt: torch.randn(3, 7, classes, dtype=dt)
                                     .transpose(1, 2)), (3, 7)
    yield "d-dims that do not flatten", (lambda dt: torch.randn(2, classes, 4, 6, dtype=dt)
                                         .transpose(2, 3)), (2, 6, 4)
    yield "column-major", (lambda dt: torch.randn(classes, 21, dtype=dt).t()), (21,)


@pytest.mark.parametrize("classes", [3, 10, 40, 150, 700])
def test_dense_layouts_gradient_in_input_strides(kernel_backend, classes):
    """Channels-last, (B, V, T) logits, unflattenable d-dims and column-major scores:
    torch's loss and gradient with every option, and (C++) the gradient in the input's
    strides, which autograd would otherwise copy it into."""
    for name, make, target_shape in _dense_layouts(classes):
        for kwargs in (dict(), dict(label_smoothing=0.2, ignore_index=1), dict(reduction="sum"),
                       dict(reduction="none", weight=torch.rand(classes, dtype=torch.float64))):
            base = make(torch.float64)
            target = torch.randint(0, classes, target_shape)
            x, ref_x = leaf(base), leaf(base)
            assert x.stride() == base.stride()
            loss = linclass.cross_entropy(x, target, **kwargs)
            loss.sum().backward()
            ref = F.cross_entropy(ref_x, target, **kwargs)
            ref.sum().backward()
            torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12, msg=name)
            torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-10, atol=1e-12, msg=name)
            if kernel_backend == "cpp":
                grad = torch.ops.linclass.cross_entropy(x.detach(), target, None, -100, 0.0, 1, True)[1]
                assert grad.stride() == x.stride(), name
        if kernel_backend == "cpp":  # float32 through the lane, group and row paths
            x = make(torch.float32)
            target = torch.randint(0, classes, target_shape)
            loss, grad = torch.ops.linclass.cross_entropy(x, target, None, -100, 0.0, 1, True)
            ref_x = leaf(x.double())
            F.cross_entropy(ref_x, target).backward()
            assert_close(loss, F.cross_entropy(x.double(), target).float(), torch.float32)
            assert_close(grad, ref_x.grad.float(), torch.float32)
            assert grad.stride() == x.stride(), name


@pytest.mark.parametrize("op", ["cross_entropy", "multi_margin_loss"])
def test_compiled_dense_layouts(kernel_backend, op):
    """Under torch.compile the fake kernel must give the gradient the strides the kernel
    gives it (Inductor checks them): column-major, channels-last and (B, V, T) inputs."""
    torch._dynamo.reset()
    fn = getattr(linclass, op)
    compiled = torch.compile(lambda x, t: fn(x, t) * 2.0, fullgraph=True)
    layouts = [("column-major", torch.randn(12, 30).t(), torch.randint(0, 12, (30,)))]
    if op == "cross_entropy":
        layouts += [("channels_last", torch.randn(2, 6, 3, 5).to(memory_format=torch.channels_last),
                     torch.randint(0, 6, (2, 3, 5))),
                    ("logits.transpose(1, 2)", torch.randn(2, 4, 50).transpose(1, 2),
                     torch.randint(0, 50, (2, 4)))]
    for name, x, t in layouts:
        xa, xb = leaf(x), leaf(x)
        compiled(xa, t).backward()
        (getattr(F, op)(xb, t) * 2.0).backward()
        assert_close(xa.grad, xb.grad, torch.float32)
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_follows_torchs_policy(kernel_backend, dtype):
    """Under torch.autocast torch runs cross_entropy and multi_margin_loss in float32 and
    F.linear in the autocast dtype; linclass does the same, so the loss's dtype and value
    and the gradients are torch's.  The kernels read the 16-bit scores as they are (no
    float32 copy) and return a float32 loss; the fused linear ops' loss is float32 from
    their 16-bit scores, not rounded to 16 bits."""
    torch.manual_seed(0)
    x, W, y = torch.randn(40, 24), torch.randn(70, 24), torch.randint(0, 70, (40,))
    class_weight = torch.rand(70)

    def run(loss_fn, fused=False, **kw):
        w, xx = W.clone().requires_grad_(), x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype):
            loss = loss_fn(xx, w, y, **kw) if fused else loss_fn(F.linear(xx, w), y, **kw)
        # 'none': a float32 grad_output per row that 16 bits do not hold.
        loss.backward(torch.linspace(0.3, 1.7, 40) if loss.dim() else None)
        return loss, w.grad, xx.grad

    for ours, theirs, kw in ((linclass.cross_entropy, F.cross_entropy, dict(label_smoothing=0.1)),
                             (linclass.cross_entropy, F.cross_entropy, dict(weight=class_weight.to(dtype))),
                             (linclass.cross_entropy, F.cross_entropy, dict(weight=class_weight)),
                             (linclass.multi_margin_loss, F.multi_margin_loss, dict(p=2))):
        (loss, gw, gx), (ref, ref_gw, ref_gx) = run(ours, **kw), run(theirs, **kw)
        assert loss.dtype == ref.dtype == torch.float32
        assert_close(loss, ref, torch.float32)
        assert gw.dtype == torch.float32
        if kernel_backend == "triton" and dtype == torch.bfloat16:
            # The Triton interpreter truncates float32 to bfloat16 (GPUs round to nearest).
            torch.testing.assert_close(gw, ref_gw, rtol=2 * torch.finfo(dtype).eps, atol=1e-3)
            torch.testing.assert_close(gx, ref_gx, rtol=2 * torch.finfo(dtype).eps, atol=1e-3)
            continue
        assert_close(gw, ref_gw, torch.float32)
        assert_close(gx, ref_gx, torch.float32)
    # 'none' with a grad_output per row: the saved 16-bit gradient is scaled and rounded
    # again (torch scales in float32 and rounds once), so against the float64 gradient of
    # the same 16-bit scores and grad_output ours errs up to about twice as much as torch.
    (loss, gw, _), (ref, ref_gw, _) = (run(fn, reduction="none") for fn in (linclass.cross_entropy,
                                                                            F.cross_entropy))
    assert loss.dtype == ref.dtype == torch.float32
    assert_close(loss, ref, torch.float32)
    w64 = W.to(dtype).double().requires_grad_()
    F.cross_entropy(F.linear(x.to(dtype).double(), w64), y, reduction="none").backward(
        torch.linspace(0.3, 1.7, 40, dtype=torch.float64))
    assert (gw - w64.grad).abs().max() <= 2.5 * (ref_gw - w64.grad).abs().max()
    seen = []

    class Recorder(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append((str(func), args[0].shape if isinstance(args[0], torch.Tensor) else None))
            return func(*args, **(kwargs or {}))

    scores = torch.randn(40, 70).to(dtype)
    for fn in (linclass.cross_entropy, linclass.multi_margin_loss):
        seen.clear()
        with torch.autocast("cpu", dtype=dtype), Recorder():
            assert fn(scores, y).dtype == torch.float32
        assert seen and ("aten._to_copy.default", scores.shape) not in seen, seen
    for ours, theirs in ((linclass.linear_cross_entropy, F.cross_entropy),
                         (linclass.linear_multi_margin_loss, F.multi_margin_loss)):
        (loss, gw, gx), (ref, ref_gw, ref_gx) = run(ours, fused=True), run(theirs)
        assert loss.dtype == ref.dtype == torch.float32
        # The loss of the 16-bit scores, in float32: close to the float64 loss of
        # F.linear's 16-bit scores (the loss rounded to 16 bits would be ~1e-3 off).
        exact = theirs(F.linear(x.to(dtype), W.to(dtype)).double(), y)
        torch.testing.assert_close(loss.double(), exact, rtol=1e-5, atol=0)
        assert gw.dtype == torch.float32
        # 16-bit products on both sides: the gradients agree to the 16-bit rounding.
        torch.testing.assert_close(gw, ref_gw, rtol=2 * torch.finfo(dtype).eps, atol=1e-3)
        torch.testing.assert_close(gx, ref_gx, rtol=2 * torch.finfo(dtype).eps, atol=1e-3)
    # float64 stays float64 under autocast, as in torch.
    s = torch.randn(40, 70, dtype=torch.float64)
    with torch.autocast("cpu", dtype=dtype):
        assert linclass.cross_entropy(s, y).dtype == torch.float64
