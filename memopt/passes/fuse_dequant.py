"""fuse_dequant: every matmul that reads a dequantized base weight becomes one fused kernel call.

A quantized linear (Note [Quantized linears] in :mod:`memopt.runtime.qlinear`) reaches the joint graph as
``W = memopt::dequantize_<fmt>(storage...)`` feeding the forward's ``addmm(b, x, t(W))`` / ``mm(x,
t(W))`` and the backward's input gradient ``mm(grad, t(t(W)))``. This pass follows ``W`` through
transposes (``t``, ``permute [1, 0]``, ``transpose``) to every ``mm``/``addmm`` that takes it as its
right operand, and replaces each by ``memopt::<fmt>_mm(x, storage..., transposed)`` (``transposed``:
the matmul reads ``W`` itself, not ``W.T``), adding the bias after it for ``addmm``. The dequantize node
and its transposes then have no users and go. Values are unchanged (the kernels are the reference up to
summation order).

A weight read any other way (as a left operand, or by an op that needs its values, e.g. DoRA's row
norm) keeps its dequantize node for those readers; the pass counts such weights as ``unfused`` and the
runner reports it.

With LoRA on an NF4 linear, the forward's ``x @ W.T + scale * (x @ A.T) @ B.T`` then becomes one
``memopt::nf4_mm_lora`` call: B's product is added in the kernel's epilogue rather than written out as a
second output-sized tensor and added (``x @ A.T`` stays its own node: the backward keeps it for B's
gradient). This is taken wherever the pattern matches with no other reader of the pieces.

Stats: ``fused_matmuls``, ``weights`` (weights with no dequantize left), ``unfused``, ``lora_epilogues``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from memopt.passes.base import Pass, PassContext, PassResult
from memopt.passes.rewrite import is_transpose, make_node

_aten = torch.ops.aten


def _dequant_ops() -> dict[Any, Any]:
    """dequantize op -> its fused matmul op (imported here: the ops exist once the runtime is loaded)."""
    import memopt.runtime.qlinear  # noqa: F401  (registers the ops)

    ops = torch.ops.memopt
    return {ops.dequantize_nf4.default: ops.nf4_mm.default, ops.dequantize_int8.default: ops.int8_mm.default}


def _storage_args(dequant: torch.fx.Node) -> tuple[Any, ...]:
    """The fused op's storage arguments, from the dequantize call's (its dtype argument dropped: the
    fused op computes in the input's dtype)."""
    if dequant.target is torch.ops.memopt.dequantize_nf4.default:
        codes, absmax, absmax2, offset, shape, _dtype = dequant.args
        return (codes, absmax, absmax2, offset, shape)
    codes, scale, _dtype = dequant.args
    return (codes, scale)


_RESHAPES = (_aten.view.default, _aten._unsafe_view.default, _aten.reshape.default)


def _only_user(node: torch.fx.Node) -> torch.fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _fuse_lora_epilogue(graph: torch.fx.Graph, fused: torch.fx.Node) -> bool:
    """``reshape(nf4_mm(x, W)) + reshape(mm(xa, t(B))) * s`` (a LoRA linear's output, as the joint graph
    has it) becomes ``reshape(nf4_mm_lora(x, W, xa, B, s))``: the up projection is added in the kernel's
    epilogue instead of writing both outputs and adding them. Each intermediate must have no other
    reader."""
    if fused.args[-1] is not False:
        return False                                   # the input gradient (x @ W) has no LoRA term
    base = _only_user(fused)
    add = _only_user(base) if base is not None and base.target in _RESHAPES else None
    if add is None or add.target is not _aten.add.Tensor or add.kwargs or base is None:
        return False
    lora = add.args[1] if add.args[0] is base else add.args[0]
    if not (isinstance(lora, torch.fx.Node) and lora.target is _aten.mul.Tensor and len(lora.users) == 1):
        return False
    scale = lora.args[1] if isinstance(lora.args[0], torch.fx.Node) else lora.args[0]
    up = lora.args[0] if isinstance(lora.args[0], torch.fx.Node) else lora.args[1]
    if not isinstance(scale, (int, float)) or not isinstance(up, torch.fx.Node) or up.target not in _RESHAPES             or len(up.users) != 1:
        return False
    mm = up.args[0]
    if not (isinstance(mm, torch.fx.Node) and mm.target is _aten.mm.default and len(mm.users) == 1):
        return False
    xa, b_t = mm.args
    if not (isinstance(b_t, torch.fx.Node) and is_transpose(b_t)):
        return False
    vals = [n.meta.get("val") for n in (base, up, add)]
    shapes = [v.shape for v in vals if isinstance(v, torch.Tensor)]
    if len(shapes) != 3 or not shapes[0] == shapes[1] == shapes[2]:
        return False
    with graph.inserting_before(add):
        new = make_node(graph, torch.ops.memopt.nf4_mm_lora.default,
                        (*fused.args[:-1], xa, b_t.args[0], float(scale)), like=fused)
        out = make_node(graph, base.target, (new, *base.args[1:]), like=add)
    add.replace_all_uses_with(out)
    for node in (add, lora, up, mm, base, fused):
        graph.erase_node(node)
    if not b_t.users:
        graph.erase_node(b_t)
    return True


def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    graph = gm.graph
    fused_op_of = _dequant_ops()
    stats = {"fused_matmuls": 0, "weights": 0, "unfused": 0}
    for dequant in [n for n in graph.nodes if n.op == "call_function" and n.target in fused_op_of]:
        fused_op = fused_op_of[dequant.target]
        storage = _storage_args(dequant)
        # (reader, the operand it reads, whether that is W.T) for every non-transpose reader of W or
        # of a transpose of it
        stack: list[tuple[torch.fx.Node, bool]] = [(dequant, False)]
        readers: list[tuple[torch.fx.Node, torch.fx.Node, bool]] = []
        transposes: list[torch.fx.Node] = []
        while stack:
            value, flipped = stack.pop()
            for user in value.users:
                if is_transpose(user):
                    stack.append((user, not flipped))
                    transposes.append(user)
                else:
                    readers.append((user, value, flipped))
        for user, operand, flipped in readers:
            if (user.target is _aten.mm.default and len(user.args) == 2 and user.args[1] is operand
                    and user.args[0] is not operand):
                x, bias = user.args[0], None
            elif (user.target is _aten.addmm.default and len(user.args) == 3 and user.args[2] is operand
                  and user.args[1] is not operand and not user.kwargs):      # beta = alpha = 1 only
                bias, x = user.args[0], user.args[1]
            else:
                continue
            with graph.inserting_before(user):
                # mm(x, W.T) is x @ W.T: transposed=False; mm(x, W) is x @ W: transposed=True.
                fused = make_node(graph, fused_op, (x, *storage, not flipped), like=user)
                out = fused if bias is None else make_node(graph, _aten.add.Tensor, (fused, bias), like=user)
            user.replace_all_uses_with(out)
            graph.erase_node(user)
            stats["fused_matmuls"] += 1
        # Its transposes left without readers (innermost first), then the dequantize itself, go.
        for node in reversed(transposes):
            if not node.users:
                graph.erase_node(node)
        if dequant.users:
            stats["unfused"] += 1
        else:
            graph.erase_node(dequant)
            stats["weights"] += 1
    stats["lora_epilogues"] = sum(_fuse_lora_epilogue(graph, node) for node in list(graph.nodes)
                                  if node.target is torch.ops.memopt.nf4_mm.default)
    graph.lint()
    gm.recompile()
    return PassResult(gm, stats["fused_matmuls"] > 0, stats)


FUSE_DEQUANT = Pass("fuse_dequant", "joint", run, wanted=lambda config: config.quantize is not None)
