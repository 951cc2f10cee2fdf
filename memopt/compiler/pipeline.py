"""The ordered pipeline of memopt's rewriting passes.

One tuple, one line per pass, each with why it sits where it does. Model-graph passes run on Dynamo's
torch-level graph before AOTAutograd; joint-graph passes run on the aten-level joint forward+backward
graph after it. The runner checks the order (``stage`` and each pass's ``after``) before anything runs.

The rewriting passes arrive with their issues. Tests add passes of their own through
``MemoptBackend(passes=...)``, never by mutating this tuple.
"""

from __future__ import annotations

from memopt.passes.base import Pass
from memopt.passes.chunk_sequence import CHUNK_SEQUENCE
from memopt.passes.drop_causal_masks import DROP_CAUSAL_MASKS
from memopt.passes.eliminate_tokens import ELIMINATE_TOKENS
from memopt.passes.fuse_cross_entropy import FUSE_CROSS_ENTROPY
from memopt.passes.fuse_dequant import FUSE_DEQUANT
from memopt.passes.inject_adapters import INJECT_ADAPTERS
from memopt.passes.prune_backprop import PRUNE_BACKPROP
from memopt.passes.split_dropout import SPLIT_DROPOUT

PIPELINE: tuple[Pass, ...] = (
    # Model graph, first: the adapters are part of the model every later pass and the schedule see.
    INJECT_ADAPTERS,
    # Model graph (exact): a plain causal mask becomes SDPA's is_causal, so no S x S mask is made or saved
    # (Hugging Face builds one under torch.compile); before the passes that follow attention's inputs.
    DROP_CAUSAL_MASKS,
    # Model graph (lossy, only when asked): late layers' attention on the kept tokens, while the graph still
    # has one node per torch call and the sublayer can be recognised.
    ELIMINATE_TOKENS,
    # Model graph (exact, only when asked): the MLPs a slice of the sequence at a time, their slices'
    # intermediates recomputed in the backward; after the adapters, whose matmuls are part of the MLP.
    CHUNK_SEQUENCE,
    # Joint graph, first: gradients nobody trains and the nodes and saved activations only they needed
    # go before any other pass or the schedule spends work on them.
    PRUNE_BACKPROP,
    # Joint graph: a dropout's output becomes a pointwise multiply by its saved mask, which the schedule
    # may recompute (the dropout itself draws random numbers: it is never run again).
    SPLIT_DROPOUT,
    # Joint graph: the cross-entropy's backward in one op, one vocabulary-sized tensor where there were
    # two (a language model's step peaks in its loss's backward).
    FUSE_CROSS_ENTROPY,
    # Joint graph: the forward's and the backward's matmuls on a dequantized weight, fused, before the
    # cost model and the schedule see the graph.
    FUSE_DEQUANT,
)
