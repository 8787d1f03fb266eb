"""Activation recomputation that also recomputes in the double backward.

``torch.utils.checkpoint`` saves memory in the forward pass only: when forces
are taken with ``create_graph=True``, the recomputed activations become part of
the force graph and stay alive until the loss backward, so a force-trained
model keeps them all. Here each level saves only its inputs:

- forward: runs ``fn`` without a graph, saves the inputs;
- backward (forces): recomputes ``fn`` and returns its vector-Jacobian product
  through a second function that again saves only inputs and output gradients;
- double backward (loss): recomputes ``fn`` and its VJP with a graph, differentiates
  that, and frees it at once.

Peak memory is then one layer's double-backward graph instead of all of them, for
about one extra forward and one extra first backward of ``fn``. Third derivatives
are not supported.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.autograd.function import once_differentiable
from torch.autograd.graph import get_gradient_edge

Fn = Callable[..., tuple[torch.Tensor, ...]]


def _vjp(fn: Fn, inputs: Sequence[torch.Tensor], params: Sequence[torch.Tensor], grads, create_graph: bool,
         wanted: Sequence[bool]):
    """Recompute ``fn(*inputs)``; return (detached inputs, VJP w.r.t. inputs then params).

    Only the entries flagged in ``wanted`` (one flag per input, then per param) are computed; the others are None.
    """
    with torch.enable_grad():
        xs = [x.detach().requires_grad_(x.requires_grad) for x in inputs]
        outs = fn(*xs)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        targets = [*xs, *params]
        flags = [w and t.requires_grad for w, t in zip(wanted, targets)]
        wrt = [t for t, f in zip(targets, flags) if f]
        if pairs and wrt:
            outs_, grads_ = zip(*pairs)
            result = torch.autograd.grad(
                outs_, wrt, grads_, create_graph=create_graph, allow_unused=True, materialize_grads=True
            )
        else:
            result = [torch.zeros_like(w) for w in wrt]
    it = iter(result)
    return xs, [next(it) if f else None for f in flags]


def _will_need_grad(t: torch.Tensor) -> bool:
    """Whether the backward pass now running will deliver a gradient to ``t`` (``autograd.grad`` with
    ``inputs`` skips the parameters: the force pass of a force-trained model needs none)."""
    try:
        return torch._C._will_engine_execute_node(get_gradient_edge(t).node)
    except RuntimeError:
        return True


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn: Fn, n_inputs: int, *args: torch.Tensor):
        ctx.fn, ctx.n_inputs = fn, n_inputs
        ctx.save_for_backward(*args)
        with torch.no_grad():
            return tuple(fn(*args[:n_inputs]))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        args = ctx.saved_tensors
        n = ctx.n_inputs
        needs = ctx.needs_input_grad[2:]
        # inputs that need no gradient must not require one in the recomputation either
        inputs = [x if need else x.detach() for x, need in zip(args[:n], needs[:n])]
        params = args[n:]
        wanted = tuple([True] * n + [p.requires_grad and _will_need_grad(p) for p in params])
        out = _RecomputeVJP.apply(ctx.fn, n, len(grads), wanted, *inputs, *params, *grads)
        return (None, None, *out)


class _RecomputeVJP(torch.autograd.Function):
    """(inputs, params, output grads) → VJP w.r.t. inputs and params, recomputed in its own backward.

    VJP entries not ``wanted`` by the running backward pass come back as zeros without being computed;
    in the double backward only the entries that received a gradient are recomputed and differentiated.
    """

    @staticmethod
    def forward(ctx, fn: Fn, n_inputs: int, n_outputs: int, wanted: tuple[bool, ...], *args: torch.Tensor):
        ctx.fn, ctx.n_inputs, ctx.n_outputs = fn, n_inputs, n_outputs
        ctx.save_for_backward(*args)
        ctx.set_materialize_grads(False)
        n_params = len(args) - n_inputs - n_outputs
        inputs, params, grads = args[:n_inputs], args[n_inputs : n_inputs + n_params], args[n_inputs + n_params :]
        ctx.input_requires_grad = [x.requires_grad for x in inputs]
        _, vjp = _vjp(fn, inputs, params, grads, create_graph=False, wanted=wanted)
        return tuple(v if v is not None else torch.zeros_like(a) for v, a in zip(vjp, args[: n_inputs + n_params]))

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_vjp: torch.Tensor | None):
        args = ctx.saved_tensors
        n, m = ctx.n_inputs, ctx.n_outputs
        n_params = len(args) - n - m
        inputs, params, grads = args[:n], args[n : n + n_params], args[n + n_params :]
        with torch.enable_grad():
            inputs = [x.detach().requires_grad_(r) for x, r in zip(inputs, ctx.input_requires_grad)]
            gs = [g.detach().requires_grad_(True) for g in grads]
            wanted = [g is not None for g in grad_vjp]
            xs, vjp = _vjp(ctx.fn, inputs, params, gs, create_graph=True, wanted=wanted)
            pairs = [(v, g) for v, g in zip(vjp, grad_vjp) if v is not None and v.requires_grad and g is not None]
            wrt = [x for x in xs if x.requires_grad] + [p for p in params if p.requires_grad] + gs
            if pairs:
                vs, ggs = zip(*pairs)
                result = torch.autograd.grad(vs, wrt, ggs, allow_unused=True, materialize_grads=True)
            else:
                result = [torch.zeros_like(w) for w in wrt]
        it = iter(result)
        full = [next(it) if x.requires_grad else None for x in xs]
        full += [next(it) if p.requires_grad else None for p in params]
        full += [next(it) for _ in gs]
        return (None, None, None, None, *full)


def recompute(fn: Fn, inputs: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``fn(*inputs)`` (a tuple of tensors) with activations recomputed in backward and double backward.

    ``params`` are every tensor ``fn`` reads that needs a gradient besides ``inputs``
    (a module's parameters); anything else ``fn`` closes over is treated as constant.
    """
    return _Recompute.apply(fn, len(inputs), *inputs, *params)
