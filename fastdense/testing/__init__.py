"""What the op tests, the benchmarks and ``fastdense demo`` share.

* :mod:`~fastdense.testing.baselines` -- the per-task loops of MTLoRA,
  TADFormer and TDSS that the fused ops are compared with and timed against
* :mod:`~fastdense.testing.checks` -- the tolerance rule (at most twice the
  low-precision reference's own error) and max-error helpers
* :mod:`~fastdense.testing.backends` -- which backends can run here, and
  forcing one through :func:`fastdense.ops.backend`

Plain PyTorch; nothing here needs pytest.
"""
from fastdense.testing.backends import forced, registered, unavailable
from fastdense.testing.baselines import mtlora_inputs, mtlora_loop, tadformer_loop, tdss_loop
from fastdense.testing.checks import (Expected, assert_within_twice_the_reference_error, max_error, run_with_grads,
                                      tolerance, twice_the_reference_error)

__all__ = [
    "Expected",
    "assert_within_twice_the_reference_error",
    "forced",
    "max_error",
    "mtlora_inputs",
    "mtlora_loop",
    "registered",
    "run_with_grads",
    "tadformer_loop",
    "tdss_loop",
    "tolerance",
    "twice_the_reference_error",
    "unavailable",
]
