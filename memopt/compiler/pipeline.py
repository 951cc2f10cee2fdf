"""The ordered pipeline of memopt's rewriting passes.

One tuple, one line per pass, each with why it sits where it does. Model-graph passes run on Dynamo's
torch-level graph before AOTAutograd; joint-graph passes run on the aten-level joint forward+backward
graph after it. The runner checks the order (``stage`` and each pass's ``after``) before anything runs.

The rewriting passes themselves (adapter injection, token elimination, backprop pruning, dequant fusion)
arrive with their issues; until then the pipeline is empty and memopt compiles through capture, cost
annotation, simulation and partition only. Tests add passes of their own through
``MemoptBackend(passes=...)``, never by mutating this tuple.
"""

from __future__ import annotations

from memopt.passes.base import Pass

PIPELINE: tuple[Pass, ...] = ()
