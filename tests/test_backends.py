"""Backend selection, the extension build, and the no-extension fallback."""

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import linclass
from linclass import backends


def test_extension_is_built():
    # CI and `make test` build linclass._C; without it nothing below is exercised.
    assert linclass._extension.HAS_CPP, linclass._extension.LOAD_ERROR
    assert linclass._extension.cpu_isa() in ("avx512", "avx2", "default")


@pytest.mark.skipif(os.environ.get("FORCE_CUDA") != "1", reason="built without FORCE_CUDA=1")
def test_cuda_kernels_are_registered():
    # With FORCE_CUDA=1 the .cu files must have compiled into linclass._C.
    for op in ("cross_entropy", "multi_margin_loss"):
        assert linclass._extension.has_kernel(op, "CUDA"), op


def _cuobjdump():
    """A cuobjdump: the CUDA toolkit's, else the one that ships with Triton."""
    cands = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")]
    try:
        import triton
        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in cands if os.path.exists(c)), None)


@pytest.mark.skipif(os.environ.get("FORCE_CUDA") != "1", reason="built without FORCE_CUDA=1")
def test_cuda_kernels_do_not_spill():
    # Every CUDA kernel instance in linclass._C (all dtypes, threads per row, archs), read
    # from the compiled cubins: no stack, i.e. no register spills.
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump")
    out = subprocess.run([tool, "-res-usage", linclass._C.__file__], capture_output=True, text=True,
                         check=True).stdout
    usage = re.findall(r"Function (\S+):\s+REG:(\d+) STACK:(\d+)", out)
    ours = [(name, int(stack)) for name, _, stack in usage if "linclass" in name]
    assert len(ours) >= 8, out[-2000:]
    assert [name for name, stack in ours if stack] == []


def test_available_and_automatic_choice():
    names = backends.available()
    assert "cpp" in names and "torch" in names
    assert set(names) <= set(backends.NAMES)
    assert backends.current() is None
    assert backends.resolve(torch.device("cpu")) == "cpp"
    assert backends.resolve(torch.device("meta")) == "torch"


class _CudaLike:
    """Stands in for a CUDA tensor of `nbytes` bytes (the routing rule reads only these)."""

    is_cpu, is_cuda, device = False, True, torch.device("cuda")

    def __init__(self, nbytes):
        self.nbytes = nbytes

    def numel(self):
        return self.nbytes // 2

    def element_size(self):
        return 2


@pytest.fixture
def both_gpu_backends(monkeypatch):
    """Both GPU backends reported built, as on a CUDA machine (the rule runs on CPU)."""
    monkeypatch.setitem(backends._REASONS, "cuda", None)
    monkeypatch.setitem(backends._REASONS, "triton", None)
    monkeypatch.setattr(backends, "_ENV", None)


def test_gpu_routing_goes_by_problem_size(both_gpu_backends):
    limit = backends.TRITON_MIN_BYTES
    assert backends.gpu_auto(0) == "cuda"
    assert backends.gpu_auto(limit - 1) == "cuda"
    assert backends.gpu_auto(limit) == "triton"
    assert backends.gpu_auto(None) == "triton"  # size unknown: the large-problem choice
    assert backends.resolve(torch.device("cuda")) == "triton"
    assert backends.resolve_for(_CudaLike(1 << 20)) == "cuda"
    assert backends.resolve_for(_CudaLike(limit)) == "triton"
    # an explicit size wins over the tensor's own (the fused linear ops pass theirs)
    assert backends.resolve_for(_CudaLike(1 << 20), nbytes=limit) == "triton"
    assert backends.resolve_for(_CudaLike(limit), nbytes=64) == "cuda"


def test_gpu_routing_threshold_is_read_per_call(both_gpu_backends, monkeypatch):
    monkeypatch.setattr(backends, "TRITON_MIN_BYTES", 1000)
    assert backends.resolve_for(_CudaLike(998)) == "cuda"
    assert backends.resolve_for(_CudaLike(1000)) == "triton"


def test_gpu_routing_with_one_gpu_backend(monkeypatch):
    monkeypatch.setattr(backends, "_ENV", None)
    for built, want in ((("triton",), "triton"), (("cuda",), "cuda"), ((), "torch")):
        for name in ("cuda", "triton"):
            monkeypatch.setitem(backends._REASONS, name, None if name in built else "not built")
        assert backends.gpu_auto(1) == backends.gpu_auto(None) == want
        assert backends.resolve_for(_CudaLike(1)) == want


def test_forced_backend_overrides_gpu_routing(both_gpu_backends):
    with backends.use("triton"):
        assert backends.resolve_for(_CudaLike(1)) == "triton"
    with backends.use("cuda"):
        assert backends.resolve_for(_CudaLike(1 << 40)) == "cuda"
    with backends.use("torch"):
        assert backends.resolve_for(_CudaLike(1)) == "torch"


@pytest.mark.skipif("cpp" not in backends.available(), reason="needs the C++ kernels")
def test_small_cpu_hinge_runs_on_torch_when_automatic():
    """Up to CPU_TORCH_HINGE_MAX_SCORES float32/64 scores the automatic choice runs
    multi_margin_loss on torch (host-bound sizes, where torch's C++ autograd node is
    cheaper); above it, in 16-bit types, or with a backend forced, the C++ kernel."""
    limit = backends.CPU_TORCH_HINGE_MAX_SCORES

    def node(rows, cols, dtype=torch.float32):
        x = torch.randn(rows, cols, dtype=dtype, requires_grad=True)
        return type(linclass.multi_margin_loss(x, torch.randint(0, cols, (rows,))).grad_fn).__name__

    assert node(4, 10) == node(limit // 16, 16) == "MultiMarginLossBackward0"  # torch's
    assert node(4, 10, torch.float64) == "MultiMarginLossBackward0"
    assert node(limit // 16 + 1, 16) == "LinclassMultiMarginLossBackward"
    assert node(4, 10, torch.bfloat16) == "LinclassMultiMarginLossBackward"
    with backends.use("cpp"):
        assert node(4, 10) == "LinclassMultiMarginLossBackward"


@pytest.mark.skipif("cpp" not in backends.available(), reason="needs the C++ kernels")
def test_small_cpu_cross_entropy_runs_on_torch_when_automatic():
    """While scores + CPU_TORCH_CROSS_ENTROPY_ROW_COST per row stay within
    CPU_TORCH_CROSS_ENTROPY_MAX_COST, the automatic choice runs a float32/64
    cross_entropy on torch (whose graph ends in NllLossBackward0); above it, in 16-bit
    types, empty, or with a backend forced, the C++ kernel."""
    limit, row = backends.CPU_TORCH_CROSS_ENTROPY_MAX_COST, backends.CPU_TORCH_CROSS_ENTROPY_ROW_COST

    def node(shape, dtype=torch.float32):
        x = torch.randn(*shape, dtype=dtype, requires_grad=True)
        classes = shape[1] if len(shape) > 1 else shape[0]
        t = torch.randint(0, classes, shape[:1] + shape[2:] if len(shape) > 1 else ())
        return type(linclass.cross_entropy(x, t).grad_fn).__name__

    rows = limit // (10 + row)  # the most rows of 10 classes that go to torch
    assert node((4, 10)) == node((rows, 10)) == node((1000,)) == "NllLossBackward0"
    assert node((4, 10), torch.float64) == "NllLossBackward0"
    assert node((rows + 1, 10)) == "LinclassCrossEntropyBackward"
    assert node((limit - row + 1,)) == "LinclassCrossEntropyBackward"  # one row, over
    assert node((2, 10, 3, 2)) == "NllLoss2DBackward0"  # 12 rows of 10 classes
    assert node((4, 10), torch.bfloat16) == "LinclassCrossEntropyBackward"
    with backends.use("cpp"):
        assert node((4, 10)) == "LinclassCrossEntropyBackward"
    empty = torch.randn(0, 10, requires_grad=True)
    assert type(linclass.cross_entropy(empty, torch.zeros(0, dtype=torch.long),
                                       reduction="sum").grad_fn).__name__ == \
        "LinclassCrossEntropyBackward"


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("shape", [(7, 5), (5,), (3, 5, 2)])
def test_small_cpu_cross_entropy_on_torch_is_torch_exactly(reduction, weighted, smoothing, shape):
    """The route to torch gives F.cross_entropy's loss and gradient bit for bit (ignored
    rows included), and its errors."""
    classes = shape[1] if len(shape) > 1 else shape[0]
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, classes, shape[:1] + shape[2:] if len(shape) > 1 else ())
    if t.dim():
        t.view(-1)[0] = 1  # ignore_index below
    w = torch.rand(classes, dtype=torch.float64) if weighted else None
    kwargs = dict(weight=w, reduction=reduction, label_smoothing=smoothing, ignore_index=1)
    ours = linclass.cross_entropy(x, t, **kwargs)
    (g_ours,) = torch.autograd.grad(ours.sum(), x)
    ref = F.cross_entropy(x, t, **kwargs)
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    assert not type(ours.grad_fn).__name__.startswith("Linclass")
    # Bit for bit; an ignored one-sample loss is NaN in both.
    torch.testing.assert_close(ours, ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(g_ours, g_ref, rtol=0, atol=0, equal_nan=True)
    bad = t.clone().fill_(classes)
    with pytest.raises(Exception) as torch_error:
        F.cross_entropy(x, bad)
    with pytest.raises(type(torch_error.value), match="out of bounds"):
        linclass.cross_entropy(x, bad)
    with pytest.raises(ValueError, match="not a valid value for reduction"):
        linclass.cross_entropy(x, t, reduction="average")



@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("p,margin", [(1, 1.0), (2, 0.5)])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", [(7, 5), (5,)])
def test_small_cpu_hinge_on_torch_is_torch_exactly(reduction, p, margin, weighted, shape):
    """The route to torch (which calls torch's kernel directly when it can) gives
    F.multi_margin_loss's loss and gradient bit for bit, and its errors."""
    classes = shape[-1]
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, classes, shape[:-1] if len(shape) == 2 else ())
    w = torch.rand(classes, dtype=torch.float64) if weighted else None
    ours = linclass.multi_margin_loss(x, t, p=p, margin=margin, weight=w, reduction=reduction)
    (g_ours,) = torch.autograd.grad(ours.sum(), x)
    ref = F.multi_margin_loss(x, t, p=p, margin=margin, weight=w, reduction=reduction)
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    assert type(ours.grad_fn).__name__ == "MultiMarginLossBackward0"
    assert torch.equal(ours, ref) and torch.equal(g_ours, g_ref)
    bad = t.clone().fill_(classes)
    with pytest.raises(RuntimeError) as torch_error:
        F.multi_margin_loss(x, bad)
    with pytest.raises(type(torch_error.value), match="target"):
        linclass.multi_margin_loss(x, bad)
    with pytest.raises(ValueError, match="only p == 1 and p == 2"):
        linclass.multi_margin_loss(x, t, p=3)
    with pytest.raises(ValueError, match="not a valid value for reduction"):
        linclass.multi_margin_loss(x, t, reduction="average")
    legacy = linclass.multi_margin_loss(x, t, p=p, margin=margin, weight=w, size_average=False)
    assert torch.equal(legacy, F.multi_margin_loss(x, t, p=p, margin=margin, weight=w, reduction="sum"))

def test_linear_ops_route_by_the_bytes_they_touch():
    from linclass.functional import _linear_bytes

    x, w = torch.empty(200, 3073, dtype=torch.bfloat16), torch.empty(10, 3073, dtype=torch.bfloat16)
    assert _linear_bytes(x, w) == (200 * 3073 + 10 * 3073 + 200 * 10) * 2
    assert _linear_bytes(x[0], w) == (3073 + 10 * 3073 + 10) * 2


def test_use_forces_and_restores():
    x, t = torch.randn(5, 4), torch.randint(0, 4, (5,))
    with backends.use("torch"):
        assert backends.current() == "torch"
        with backends.use("cpp"):
            assert backends.resolve(x.device) == "cpp"
        assert backends.resolve(x.device) == "torch"
        torch.testing.assert_close(linclass.cross_entropy(x, t), F.cross_entropy(x, t))
    assert backends.current() is None


def test_unknown_and_unavailable_backends_raise():
    with pytest.raises(ValueError, match="unknown linclass backend"):
        with backends.use("fast"):
            pass
    if "cuda" not in backends.available():
        with pytest.raises(backends.BackendUnavailable, match="'cuda' is not available"):
            with backends.use("cuda"):
                pass
    # A backend that exists but cannot take these tensors is an error, not a fallback.
    if "cuda" in backends.available():
        with backends.use("cuda"):
            with pytest.raises(backends.BackendUnavailable, match="cannot run on cpu"):
                linclass.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]))


def _run(code, **env):
    full_env = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=full_env, timeout=300)


def test_environment_variable_selects_backend():
    r = _run("""
        import torch, linclass
        print(linclass.backends.current(), linclass.backends.resolve(torch.device("cpu")))
    """, LINCLASS_BACKEND="torch")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["torch", "torch"]
    r = _run("import linclass", LINCLASS_BACKEND="nope")
    assert r.returncode != 0 and "unknown linclass backend 'nope'" in r.stderr


def test_import_without_extension_warns_once_and_falls_back():
    r = _run("""
        import sys, warnings
        sys.modules["linclass._C"] = None  # as if the extension had failed to build
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, linclass
            import torch.nn.functional as F
            x, t = torch.randn(6, 4, requires_grad=True), torch.randint(0, 4, (6,))
            loss = linclass.cross_entropy(x, t)
            loss.backward()
            assert torch.allclose(loss, F.cross_entropy(x, t))
            assert torch.allclose(linclass.multi_margin_loss(x, t), F.multi_margin_loss(x, t))
            names = linclass.backends.available()
            print("cpp" in names, "torch" in names, linclass.backends.resolve(x.device))
            try:
                with linclass.backends.use("cpp"):
                    pass
            except linclass.backends.BackendUnavailable as e:
                print("raised:", e)
        mine = [w for w in caught if "linclass" in str(w.message)]
        print(len(mine), mine[0].category.__name__)
    """)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "False True torch"
    assert lines[1].startswith("raised: linclass backend 'cpp' is not available")
    assert lines[2] == "1 RuntimeWarning"


def test_buffer_cache_reuses_and_clears():
    x = torch.randn(512, 1024, requires_grad=True)  # 2 MiB: cached
    t = torch.randint(0, 1024, (512,))
    backends.empty_cache()
    linclass.cross_entropy(x, t).backward()
    first = x.grad.data_ptr()
    x.grad = None  # the buffer goes back to the cache ...
    linclass.cross_entropy(x, t).backward()
    assert x.grad.data_ptr() == first  # ... and is handed out again
    blocks, nbytes, hits, misses = torch.ops.linclass._buffer_cache_stats()
    assert hits >= 1
    x.grad = None
    assert torch.ops.linclass._buffer_cache_stats()[0] >= 1
    backends.empty_cache()
    assert torch.ops.linclass._buffer_cache_stats()[:2] == [0, 0]


def test_buffer_cache_can_be_disabled():
    r = _run("""
        import torch, linclass
        x = torch.randn(512, 1024, requires_grad=True)
        linclass.cross_entropy(x, torch.randint(0, 1024, (512,))).backward()
        x.grad = None
        print(torch.ops.linclass._buffer_cache_stats())
    """, LINCLASS_CPU_CACHE_MB="0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[0, 0, 0, 0]"
