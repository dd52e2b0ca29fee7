"""exp and log for the Triton kernels, exact to the input's precision.

tl.exp / tl.log lower to the GPU's fast float32 approximations even for float64
operands (seen on an H200 with triton 3.6: float64 losses off by ~3e-8 relative), so
float64 goes through libdevice's double-precision functions.  The Triton interpreter
(TRITON_INTERPRET=1, CI) has no libdevice and computes tl.exp / tl.log in the operand's
own precision already, so there both are plain tl.exp / tl.log.
"""

import os

import triton
import triton.language as tl

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):

    @triton.jit
    def exp(x):
        return tl.exp(x)

    @triton.jit
    def log(x):
        return tl.log(x)

else:
    from triton.language.extra import libdevice

    @triton.jit
    def exp(x):
        if x.dtype == tl.float64:
            return libdevice.exp(x)
        else:
            return tl.exp(x)

    @triton.jit
    def log(x):
        if x.dtype == tl.float64:
            return libdevice.log(x)
        else:
            return tl.log(x)
