"""Triton kernels of linclass, shipped as the package ``linclass.kernels``.

Import these modules lazily: triton must be imported after TRITON_INTERPRET is set
when the kernels are to run on CPU tensors.
"""
