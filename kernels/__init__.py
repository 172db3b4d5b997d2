"""Triton kernels of fastdense, installed as ``fastdense.kernels``.

One module per op family; each holds the @triton.jit kernels and the host
launchers ``forward``/``backward`` that follow the op's tensor contract.
Importing this package requires triton.
"""
