"""One declaration per op: the machinery every fastdense operator shares.

An op module (``fastdense/ops/<family>.py``) declares what is specific to its
op -- schema, backends with their limits, fake shapes, what is saved for the
backward -- and :func:`define_op` turns that into

* the operator ``torch.ops.fastdense.<name>``: picks a backend, runs its
  forward, and returns outputs that are legal for a custom op (see
  :func:`fresh_outputs`);
* its fake kernel, so ``torch.compile(fullgraph=True)`` traces through it;
* the operator ``torch.ops.fastdense.<name>_backward`` with its fake kernel,
  so the backward is traced too (and runs under AOT autograd);
* the registered autograd formula that links the two.

The backward runs the backend the forward ran: :func:`setup_context` records
its name and hands it to the backward operator, which autograd may run on
another thread (CUDA), where a :func:`fastdense.ops.backend` context of the
caller is not visible. That is the only place a backend choice crosses from
forward to backward.

Backend calling convention (every backend of an op follows it):

    forward(*args)                    -> one tensor per declared output
    backward(*grads, *saved, needs)   -> one tensor per differentiable input,
                                         in ``differentiable`` order (None or
                                         an empty tensor where ``needs`` is False)

``grads`` are the incoming gradients of the outputs named in
``grad_outputs``; ``saved`` the values named in ``saved``.

Strides. Every tensor a backend receives is contiguous: the operators make
their tensor arguments contiguous (a no-op for contiguous ones) before any
backend sees them, forward and backward, so no kernel has to honour a
caller's strides (a column slice, a stride-0 expansion, a transpose).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Optional, Sequence

import torch

from fastdense import _ext, _triton
from fastdense.ops import _dispatch
from fastdense.ops._dispatch import Backend, Limit
from fastdense.ops._validate import FLOATING

_ARG = re.compile(r"^\s*(?P<type>[\w\[\]?]+)\s+(?P<name>\w+)\s*$")


def _parse_args(text: str) -> list[tuple[str, str]]:
    """"Tensor x, int[] ranks" -> [("Tensor", "x"), ("int[]", "ranks")]."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = _ARG.match(part)
        if m is None:
            raise ValueError(f"cannot parse schema argument {part!r}")
        out.append((m["type"], m["name"]))
    return out


@dataclasses.dataclass(frozen=True)
class Derived:
    """A value saved for backward that is computed from the inputs (e.g. a batch size)."""

    name: str
    type: str
    fn: Callable  # fn(args: dict of inputs) -> value


# ----------------------------------------------------------------------------- custom-op outputs
def _contiguous(values):
    return tuple(v.contiguous() if isinstance(v, torch.Tensor) else v for v in values)


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def fresh_outputs(outputs: Iterable[Optional[torch.Tensor]], needs: Sequence[bool], like: torch.Tensor,
                  inputs: Iterable[object]) -> tuple[torch.Tensor, ...]:
    """Make a backend's results legal outputs of a custom op.

    A custom op's outputs may alias neither its inputs nor each other (PyTorch
    checks this), yet a backend may hand back a view of an input (e.g. a
    gradient equal to ``grad``) or one tensor twice. So:

    * an output that is not needed (``needs[i]`` false) or is None becomes an
      empty ``like.new_empty(0)`` (the autograd formula maps it to None);
    * an empty output becomes a fresh empty tensor of its shape and dtype;
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
            g = g.new_empty(g.shape)
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
    tensor, or a meta tensor (shape propagation has no autocast), is left as it is.
    """
    lead = tensors[0]
    if (not isinstance(lead, torch.Tensor) or lead.device.type == "meta"
            or not torch.is_autocast_enabled(lead.device.type)):
        return tensors
    dtype = torch.get_autocast_dtype(lead.device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


# ----------------------------------------------------------------------------- backends
GPU_FLOATING = (torch.float32, torch.float16, torch.bfloat16)


def _tuple(dtypes):
    return None if dtypes is None else tuple(dtypes)


def torch_backend(forward: Callable, backward: Callable) -> Backend:
    """Plain PyTorch: any device, any dtype."""
    return Backend("torch", forward, backward)


def cpp_backend(forward: Callable, backward: Callable, *, kernels: Sequence[str], dtypes=FLOATING,
                limits: Sequence[Limit] = ()) -> Backend:
    """fastdense._C's CPU kernels ``kernels`` (internal op names, e.g. "_mt_lora_fwd")."""
    return Backend("cpp", forward, backward, device="cpu", dtypes=_tuple(dtypes),
                   limits=tuple(limits), machine=_ext.machine_reasons(_ext.cpu_reasons, "CPU", *kernels))


def cuda_backend(forward: Callable, backward: Callable, *, kernels: Sequence[str], dtypes=GPU_FLOATING,
                 limits: Sequence[Limit] = ()) -> Backend:
    """fastdense._C's CUDA kernels ``kernels``."""
    return Backend("cuda", forward, backward, device="cuda", dtypes=_tuple(dtypes),
                   limits=tuple(limits), machine=_ext.machine_reasons(_ext.cuda_reasons, "CUDA", *kernels))


def triton_backend(module: str, *, dtypes=GPU_FLOATING, limits: Sequence[Limit] = ()) -> Backend:
    """The host launchers ``forward``/``backward`` of ``fastdense.kernels.<module>``, imported on first use."""
    forward, backward = _triton.lazy_kernels(module)
    return Backend("triton", forward, backward, device="triton", dtypes=_tuple(dtypes),
                   limits=tuple(limits), machine=_triton.machine_reasons_for(module))


def ext_limit(key: str) -> Callable[[], object]:
    """A limit exported by ``fastdense._C.limits()``, read when a :class:`Limit` is checked."""
    return lambda: _ext.limit(key)


# ----------------------------------------------------------------------------- the declaration
class Op:
    """A declared fastdense operator; calling it runs ``torch.ops.fastdense.<name>``."""

    def __init__(self, name: str, *, schema: str, outputs: str, lead: str, differentiable: Sequence[str],
                 grad_outputs: Sequence[str], saved: Sequence[str | Derived], fake: Callable,
                 backends: Sequence[Backend], backward_fake: Callable | None = None):
        self.name = name
        self.inputs = _parse_args(schema)
        self.input_names = [n for _, n in self.inputs]
        self.outputs = [n for _, n in _parse_args(outputs)]
        self.lead = self.input_names.index(lead)
        self.differentiable = list(differentiable)
        self._diff_index = [self.input_names.index(n) for n in self.differentiable]
        # "theta?" marks an output whose gradient may be absent (passed as None).
        self.grad_outputs = [(n.rstrip("?"), n.endswith("?")) for n in grad_outputs]
        self._grad_out_index = [self.outputs.index(n) for n, _ in self.grad_outputs]
        self._saved = [self._resolve_saved(s) for s in saved]
        self._fake = fake
        self._backward_fake = backward_fake
        for impl in backends:
            _dispatch.register(name, dataclasses.replace(impl, lead=self.lead))

        out_schema = "Tensor" if len(self.outputs) == 1 else "(" + ", ".join("Tensor" for _ in self.outputs) + ")"
        self._op = torch.library.custom_op(f"fastdense::{name}", self._forward_impl, mutates_args=(),
                                           schema=f"({schema}) -> {out_schema}")
        self._op.register_fake(self._forward_fake)
        grads = ", ".join(f"Tensor{'?' if opt else ''} grad_{n}" for n, opt in self.grad_outputs)
        saved_schema = ", ".join(f"{t} {n}" for n, t, _ in self._saved)
        returns = ", ".join("Tensor" for _ in self.differentiable)
        returns = returns if len(self.differentiable) == 1 else f"({returns})"
        self._bwd = torch.library.custom_op(
            f"fastdense::{name}_backward", self._backward_impl, mutates_args=(),
            schema=f"({grads}, {saved_schema}, bool[] needs, str backend) -> {returns}")
        self._bwd.register_fake(self._backward_fake_impl)
        self._op.register_autograd(self._backward, setup_context=self._setup_context)

    def __repr__(self) -> str:
        return f"fastdense op {self.name!r}"

    # -- declaration helpers
    def _resolve_saved(self, s):
        """(name, schema type, getter(inputs dict, outputs dict))."""
        if isinstance(s, Derived):
            return s.name, s.type, lambda ins, outs: s.fn(ins)
        types = dict((n, t) for t, n in self.inputs)
        if s in types:
            return s, types[s], lambda ins, outs: ins[s]
        if s in self.outputs:
            return s, "Tensor", lambda ins, outs: outs[s]
        raise ValueError(f"op {self.name}: saved value {s!r} is neither an input, an output nor Derived")

    # -- forward
    def __call__(self, *args):
        """``torch.ops.fastdense.<name>(*args)``: all declared outputs."""
        return self._op(*args)

    def select(self, *args) -> Backend:
        return _dispatch.select(self.name, args[self.lead].device.type, *args)

    def run_backend(self, *args):
        """The chosen backend's forward, without the operator (and without autograd)."""
        args = _contiguous(args)
        return self.select(*args).forward(*args)

    def _forward_impl(self, *args):
        outs = self.run_backend(*args)
        if isinstance(outs, torch.Tensor):
            outs = (outs,)
        fresh = fresh_outputs(outs, [True] * len(self.outputs), args[self.lead], args)
        return fresh[0] if len(fresh) == 1 else fresh

    def _forward_fake(self, *args):
        outs = self._fake(*args)
        return outs

    # -- autograd
    def _setup_context(self, ctx, inputs, output):
        outs = (output,) if isinstance(output, torch.Tensor) else tuple(output)
        ins = dict(zip(self.input_names, inputs))
        named_outs = dict(zip(self.outputs, outs))
        values = [get(ins, named_outs) for _, _, get in self._saved]
        tensor_pos = [i for i, v in enumerate(values) if isinstance(v, torch.Tensor) or
                      (v is None and self._saved[i][1].startswith("Tensor"))]
        ctx.save_for_backward(*(values[i] for i in tensor_pos))
        ctx.tensor_pos = tensor_pos
        ctx.plain = [None if i in tensor_pos else values[i] for i in range(len(values))]
        ctx.present = [inputs[i] is not None for i in self._diff_index]
        ctx.grad_out_meta = [(outs[i].shape, outs[i].dtype, outs[i].device) for i in self._grad_out_index]
        ctx.backend = self.select(*inputs).backend
        non_diff = [o for i, o in enumerate(outs) if i not in self._grad_out_index]
        if non_diff:
            ctx.mark_non_differentiable(*non_diff)

    def _backward(self, ctx, *grad_outputs):
        nig = ctx.needs_input_grad
        needs = [present and bool(nig[i]) for present, i in zip(ctx.present, self._diff_index)]
        result = [None] * len(self.input_names)
        if not any(needs):
            return tuple(result)
        values = list(ctx.plain)
        for pos, t in zip(ctx.tensor_pos, ctx.saved_tensors):
            values[pos] = t
        grads = []
        for (_, optional), i, (shape, dtype, device) in zip(self.grad_outputs, self._grad_out_index,
                                                            ctx.grad_out_meta):
            g = grad_outputs[i]
            if g is None and not optional:
                g = torch.zeros(shape, dtype=dtype, device=device)
            grads.append(g)
        out = getattr(torch.ops.fastdense, f"{self.name}_backward")(*grads, *values, needs, ctx.backend)
        for k, i in enumerate(self._diff_index):
            if needs[k]:
                result[i] = out[k]
        return tuple(result)

    def _backward_impl(self, *args):
        n_grads = len(self.grad_outputs)
        grads = _contiguous(args[:n_grads])
        saved = _contiguous(args[n_grads:-2])
        needs, backend = list(args[-2]), args[-1]
        impl = _dispatch.implementations(self.name)[backend]
        result = impl.backward(*grads, *saved, needs)
        return fresh_outputs(result, needs, grads[0], (*grads, *saved))

    def _backward_fake_impl(self, *args):
        n_grads = len(self.grad_outputs)
        grads = args[:n_grads]
        saved = dict(zip((n for n, _, _ in self._saved), args[n_grads:-2]))
        needs = args[-2]
        if self._backward_fake is not None:
            shapes = self._backward_fake(grads, saved)
            return tuple(grads[0].new_empty(s) if need else grads[0].new_empty(0) for s, need in zip(shapes, needs))
        out = []
        for name, need in zip(self.differentiable, needs):
            t = saved.get(name)
            out.append(t.new_empty(t.shape) if (need and t is not None) else grads[0].new_empty(0))
        return tuple(out)


def define_op(name: str, **declaration) -> Op:
    """Declare the operator ``torch.ops.fastdense.<name>``; see :class:`Op` and the module docstring.

    ``schema``: the inputs in torch's schema language ("Tensor x, Tensor? bias, int[] ranks, ...");
    ``outputs``: the outputs, named ("Tensor out, Tensor h");
    ``lead``: the input whose device picks the priority list and whose device/dtype the backends check;
    ``differentiable``: the inputs that get gradients, in the order every backend's backward returns them;
    ``grad_outputs``: the outputs whose gradients the backward takes ("theta?" when it may be absent);
      the other outputs are saved values, marked non-differentiable;
    ``saved``: what the backward gets after the gradients: input names, output names, or :class:`Derived`;
    ``fake(*args)``: empty outputs of the right shapes and dtypes;
    ``backward_fake(grads, saved) -> [shape]``: only when a differentiable input is not saved (the
      gradients then take the incoming gradient's dtype);
    ``backends``: :class:`Backend` s, built with :func:`torch_backend`, :func:`cpp_backend`, ...
    """
    return Op(name, **declaration)
