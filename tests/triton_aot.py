"""Compile linclass's Triton kernels for a GPU, with no GPU: every launch the launchers
make for a set of GPU-sized problems, ahead of time, for an NVIDIA target.

    python tests/triton_aot.py [--arch 90] [--arch 80] [--json OUT]

CI has no GPU, and the Triton interpreter that runs the kernels there never compiles
them, so a kernel that only fails in Triton's compiler (or that spills registers) would
first show on a lent GPU.  Here the launchers (kernels/*.py) run on small CPU tensors
with every kernel's launch replaced by a recorder; each distinct launch (kernel,
argument types and specialization as the JIT makes them, constexprs, num_warps) is then
compiled for each target with
triton.compile, and the cubin's resource usage (registers, stack = spill space) is
read with the cuobjdump that ships with Triton.  tests/test_triton_aot.py runs this in
a subprocess (Triton decides interpreter or compiler when a kernel is defined, and the
test process is in interpreter mode).

Prints one JSON object: {"launches": [{"kernel", "constexprs", "num_warps", "arch",
"regs", "stack", "error"}...]}.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # compile, do not interpret (before triton is imported)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

def _specialize(param, v):
    """(type, attribute) of a kernel argument as the JIT specializes it on a GPU: an int
    equal to 1 becomes a constexpr (a unit stride: contiguous, vectorized access), and
    pointers and ints divisible by 16 carry that ("D", tt.divisibility).  Triton's own
    function; the CPU tensors here are 64-byte aligned, as CUDA allocations are."""
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import native_specialize_impl

    return native_specialize_impl(CUDABackend, v, param.is_const, not param.do_not_specialize,
                                  not param.do_not_specialize_on_alignment)


_TL = {d.name: d for d in (tl.float32, tl.float64, tl.bfloat16, tl.float16)}


def _constexpr(v):
    """A constexpr value as JSON (tl dtypes as "tl.<name>")."""
    return f"tl.{v.name}" if isinstance(v, tl.dtype) else v


def record():
    """The distinct launches of the Triton launchers over a set of GPU-shaped problems."""
    from linclass.kernels import cross_entropy as ce
    from linclass.kernels import linear_tile, multi_margin, scale, sharded
    from bench.tune_gpu import WALKS

    seen, launches = set(), []

    def recorder(self, grid):
        def launch(*args, **kwargs):
            options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
            sig, consts, attrs = {}, {}, {}
            for i, name in enumerate(self.arg_names):
                v = args[i] if i < len(args) else kwargs[name]
                if self.params[i].is_constexpr:
                    sig[name], consts[name] = "constexpr", v
                    continue
                sig[name], attr = _specialize(self.params[i], v)
                if sig[name] == "constexpr":
                    consts[name] = attr
                elif attr:
                    attrs[str(i)] = attr
            key = (self.fn.__module__, self.fn.__name__, json.dumps(sig),
                   json.dumps({k: _constexpr(v) for k, v in consts.items()}, sort_keys=True),
                   json.dumps(options, sort_keys=True), json.dumps(attrs, sort_keys=True))
            if key not in seen:
                seen.add(key)
                launches.append(key)
        return launch

    saved = JITFunction.__getitem__
    JITFunction.__getitem__ = recorder
    try:
        for c in (10, 1000, 32000, 128256):
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(4, c, dtype=dtype)
                t = torch.randint(0, c, (4,))
                w = torch.rand(c, dtype=dtype)
                for weight, smoothing in ((None, 0.0), (w, 0.1)):
                    ce.cross_entropy(x, t, weight, -100, smoothing, 1, True)
                ce.cross_entropy(x, t, None, -100, 0.0, 1, False)  # forward only
                multi_margin.multi_margin_loss(x, t, 1, 1.0, None, 1, True)
                multi_margin.multi_margin_loss(x, t, 2, 0.5, w, 1, True)
        ce.cross_entropy(torch.randn(4, 1000, dtype=torch.float64), torch.zeros(4, dtype=torch.long),
                         None, -100, 0.0, 1, True)
        for c in (10, 32000):  # a column-strided input (no unit stride to specialize on)
            xs = torch.randn(c, 8, dtype=torch.bfloat16).t()
            ts = torch.randint(0, c, (8,))
            ce.cross_entropy(xs, ts, None, -100, 0.0, 1, True)
            multi_margin.multi_margin_loss(xs, ts, 1, 1.0, None, 1, True)
        xb = torch.randn(4, 32000, dtype=torch.bfloat16)
        tb = torch.randint(0, 32000, (4,))
        const = ce.consts(tb, None, -100, 32000, torch.float32, True)
        for cfg in WALKS:  # the tuner's walk candidates
            ce.launch(xb, torch.empty_like(xb), tb, None, -100, 0.0, const, config=cfg)
        for c in (10, 32, linear_tile.MAX_C):  # the fused linear + loss kernel, few classes
            for ce_loss in (True, False):
                xl = torch.randn(8, 64, dtype=torch.bfloat16)
                wl = torch.randn(c, 64, dtype=torch.bfloat16)
                linear_tile.run(xl, wl, torch.randn(c, dtype=torch.bfloat16),
                                torch.randint(0, c, (8,)), (True, True, True), ce_loss)
        for dtype in (torch.float32, torch.bfloat16):
            scale.scale_([torch.ones(100, dtype=dtype)], torch.full((1,), 2.0))
        for c in (10, 64128):  # the class-sharded phases (float32 / float64 shards)
            for dtype in (torch.float32, torch.float64):
                xs = torch.randn(4, c, dtype=dtype)
                ts = torch.randint(0, c, (4,))
                ws = torch.rand(c, dtype=dtype)
                row = torch.rand(4, dtype=dtype)
                for weight, smoothing in ((None, False), (ws, True), (None, True)):
                    sharded.ce_stats(xs, ts, 0, weight, smoothing, -100)
                    sharded.ce_grad(xs, ts, 0, weight, row, row, row, row, -100)
                for p in (1, 2):
                    sharded.mm_grad(xs, ts, 0, row, row, p, 1.0, True)
                sharded.mm_grad(xs, ts, 0, row, row, 1, 1.0, False)
                probs = torch.rand(4, c, dtype=dtype)
                for weight in (None, ws):
                    sharded.ce_probs_stats(xs, probs, weight, 0.1, 2 * c)
                    sharded.ce_probs_grad(xs, probs, weight, 0.1, 2 * c, row, row, 0.25)
    finally:
        JITFunction.__getitem__ = saved
    return launches


def _ptxas_dir():
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_one(key, arch):
    """Compile one recorded launch for sm_<arch>; its registers and stack bytes."""
    import importlib

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from triton.backends.nvidia.compiler import CUDABackend

    module, name, sig, consts, options, attrs = key
    fn = getattr(importlib.import_module(module), name)
    attrs = {(int(i),): CUDABackend.parse_attr(a) for i, a in json.loads(attrs).items()}
    consts = {k: _TL[v[3:]] if isinstance(v, str) and v.startswith("tl.") else v
              for k, v in json.loads(consts).items()}
    out = {"kernel": f"{module}.{name}", "constexprs": json.loads(key[3]),
           "num_warps": json.loads(options).get("num_warps", 4), "arch": arch}
    try:
        k = triton.compile(ASTSource(fn=fn, signature=json.loads(sig), constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", arch, 32), options=json.loads(options))
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            usage = subprocess.run([os.path.join(_ptxas_dir(), "cuobjdump"), "-res-usage", f.name],
                                   capture_output=True, text=True, check=True).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
        out.update(regs=int(m.group(1)), stack=int(m.group(2)), error=None)
    except Exception as e:  # noqa: BLE001  (reported, the test fails on it)
        out.update(regs=None, stack=None, error=f"{type(e).__name__}: {e}"[:2000])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, action="append", help="SM version(s), default 90")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    if not os.path.exists(os.path.join(_ptxas_dir(), "cuobjdump")):
        sys.exit("triton_aot: this Triton has no NVIDIA backend tools (ptxas, cuobjdump)")
    launches = record()
    jobs = [(key, arch) for arch in (args.arch or [90]) for key in launches]
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(compile_one, *zip(*jobs)))
    print(json.dumps({"launches": results}))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
