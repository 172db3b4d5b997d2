"""Helpers for the outputs of fastdense's ``torch.library.custom_op`` wrappers."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def fresh_outputs(
    outputs: Iterable[Optional[torch.Tensor]],
    needs: Sequence[bool],
    like: torch.Tensor,
    inputs: Iterable[object],
) -> tuple[torch.Tensor, ...]:
    """Make a backend's results legal outputs of a custom op.

    A custom op's outputs may alias neither its inputs nor each other (PyTorch
    checks this), yet a backend may hand back a view of an input (e.g. a
    gradient equal to ``grad``) or one tensor twice. So:

    * an output that is not needed (``needs[i]`` false) or is None becomes an
      empty ``like.new_empty(0)`` (the autograd wrapper maps it to None);
    * an empty output becomes a fresh empty ``like`` tensor of its shape (the
      fake kernels give every output ``like``'s dtype);
    * an output sharing storage with a (non-empty) input or an earlier output
      is cloned; the rest are made contiguous, as the fake kernels declare.

    ``inputs`` may hold non-tensors (ints, lists, None): they are skipped.
    """
    seen = [t for t in inputs if isinstance(t, torch.Tensor)]
    out = []
    for g, need in zip(outputs, needs):
        if not need or g is None:
            g = like.new_empty(0)
        elif g.numel() == 0:
            g = like.new_empty(g.shape)
        elif any(_shares_storage(g, t) for t in seen if t.numel()):
            g = g.clone()
        else:
            g = g.contiguous()
        seen.append(g)
        out.append(g)
    return tuple(out)


def autocast_inputs(*tensors):
    """``tensors`` with every floating tensor cast to the autocast dtype when
    autocast is on for the first tensor's device, else unchanged.

    The public functions run their op like ``nn.Linear`` and SDPA do under
    autocast: in the autocast dtype, whatever the dtypes of the (fp32)
    parameters and the incoming activation. A first argument that is not a
    tensor is left for the argument checks to reject.
    """
    lead = tensors[0]
    if not isinstance(lead, torch.Tensor) or not torch.is_autocast_enabled(lead.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(lead.device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)
