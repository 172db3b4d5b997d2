"""Triton kernels of fastdense, installed as ``fastdense.kernels``.

One module per op family; each holds the @triton.jit kernels, the host
launchers ``forward``/``backward`` that follow the op's tensor contract, and
``compile_specs(...)``: what a call of a given size would compile on a GPU
(the launchers run on meta tensors, see ``_launch``), which
tests/kernels/test_sm90_compile.py builds for Hopper on any machine.
Importing this package requires triton.
"""
