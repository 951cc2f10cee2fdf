"""The ``verify`` option: a compiled graph's first training calls checked against eager PyTorch.

Note [Verifying against eager]
memopt's lossless rewrites (adapters, quantized weights' fused dequantisation, recompute, offload) must
leave every value and gradient as eager PyTorch computes it; the tests hold that on the models they
know. ``verify: N`` holds it on the user's own model: for each graph's first ``N`` calls that train, the
compiled graph and the graph Dynamo captured (before any memopt pass, run op by op) each run on their
own copies of the inputs, from the same random state, and are differentiated against the same random
cotangents; their outputs and the gradients of every input that requires one are compared, each with the
tolerance of its dtype (``torch.testing.assert_close``'s), the absolute part scaled to the reference's
largest entry (a sum rounded in another order differs in proportion to its terms). A difference raises
:class:`MemoptVerificationError` naming the graph, the call, the value (a parameter by its name) and the
difference, before the real call runs: the training state is untouched. The real call then runs as
usual. The cost, only for the checked calls: two more forwards and backwards, and two copies of the
graph's inputs. Graphs that draw random numbers are checked only under ``codegen="eager"``, which draws
them in eager's order (Inductor's generator is another); lossy options are refused with ``verify``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx

from memopt.errors import MemoptVerificationError
from memopt.names import GraphInput

# (rtol, atol) per dtype: torch.testing.assert_close's defaults.
_TOLERANCES = {torch.float16: (1e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5), torch.float32: (1.3e-6, 1e-5),
               torch.float64: (1e-7, 1e-7)}


def verifying(compiled: Callable[..., Any], reference: torch.fx.GraphModule, inputs: Sequence[GraphInput],
              steps: int, graph: str) -> Callable[..., Any]:
    """``compiled``, whose first ``steps`` training calls are checked against ``reference`` first."""
    left = steps

    def run(*args: Any) -> Any:
        nonlocal left
        if left > 0 and torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad
                                                         for a in args):
            left -= 1
            check(compiled, reference, args, inputs, f"graph {graph}, checked call {steps - left}")
        return compiled(*args)

    return run


def check(compiled: Callable[..., Any], reference: Callable[..., Any], args: Sequence[Any],
          inputs: Sequence[GraphInput], where: str) -> None:
    """Run both on copies of ``args`` and compare outputs and input gradients (Note [Verifying against
    eager])."""
    state = torch.random.get_rng_state()
    ours = _outputs_and_grads(compiled, args)
    torch.random.set_rng_state(state)
    theirs = _outputs_and_grads(reference, args)
    torch.random.set_rng_state(state)
    names = [_name(inputs, i) for i in range(len(args))]
    for index, (mine, eager) in enumerate(zip(ours[0], theirs[0])):
        _compare(mine, eager, f"{where}: output {index}")
    for index, mine in ours[1].items():
        _compare(mine, theirs[1][index], f"{where}: the gradient of {names[index]}")


def _name(inputs: Sequence[GraphInput], index: int) -> str:
    if index < len(inputs) and inputs[index].name:
        return f"{inputs[index].kind} {inputs[index].name!r}"
    return f"input {index}"


def _outputs_and_grads(fn: Callable[..., Any], args: Sequence[Any],
                       ) -> tuple[list[torch.Tensor | None], dict[int, torch.Tensor | None]]:
    """``fn``'s outputs on copies of ``args``, and the gradients of the copies that require one against
    fixed random cotangents."""
    copies = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
              for a in args]
    outputs = fn(*copies)
    outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
    tensors = [o if isinstance(o, torch.Tensor) else None for o in outputs]
    differentiable = [o for o in tensors if o is not None and o.requires_grad]
    leaves = {i: c for i, c in enumerate(copies) if isinstance(c, torch.Tensor) and c.requires_grad}
    generator = torch.Generator(device="cpu").manual_seed(0)
    cotangents = [torch.randn(o.shape, generator=generator, dtype=torch.float32).to(o.device, o.dtype)
                  for o in differentiable]
    grads = torch.autograd.grad(differentiable, list(leaves.values()), cotangents, allow_unused=True) \
        if differentiable and leaves else [None] * len(leaves)
    return [t.detach() if t is not None else None for t in tensors], dict(zip(leaves, grads))


def _compare(mine: torch.Tensor | None, eager: torch.Tensor | None, what: str) -> None:
    if mine is None or eager is None:
        if (mine is None) != (eager is None):
            raise MemoptVerificationError(f"memopt verify: {what} exists in {'eager' if mine is None else 'memopt'}'s "
                                          "step only")
        return
    if not eager.dtype.is_floating_point:
        if not torch.equal(mine, eager):
            raise MemoptVerificationError(f"memopt verify: {what} differs from eager PyTorch's (exact dtype {eager.dtype})")
        return
    rtol, atol = _TOLERANCES.get(eager.dtype, (1.3e-6, 1e-5))
    scale = float(eager.detach().abs().max()) if eager.numel() else 0.0
    atol = max(atol, rtol * scale)
    difference = (mine.detach().double() - eager.detach().double()).abs()
    excess = difference - rtol * eager.detach().double().abs()
    if eager.numel() and float(excess.max()) > atol:
        worst = int(excess.argmax())
        raise MemoptVerificationError(
            f"memopt verify: {what} differs from eager PyTorch's: largest difference "
            f"{float(difference.max()):.3g} (at flat index {worst}: {float(mine.flatten()[worst]):.6g} against "
            f"{float(eager.flatten()[worst]):.6g}), beyond the {eager.dtype} tolerance (rtol {rtol:g}, atol "
            f"{atol:.3g} = rtol x the largest entry). Compile without memopt's options one at a time to find "
            "the one responsible, and report it with the dump (options dump_dir)")
