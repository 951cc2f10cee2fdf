"""Per-node times of real steps (the ``dump_node_times`` option), for ``memopt tune --from-dump``.

Note [Recording node times]
~~~~~~~~~~~~~~~~~~~~~~~~~~~
For its first N calls a graph runs op by op through an FX interpreter that times every node; a node's
time is the median over the N calls. On CUDA the time is what torch's profiler says the kernels launched
inside the node's ``record_function`` range ran on the device. On a CPU it is the interpreter's own clock
around the node (the op runs on the calling thread, so the clock sees all of it): the profiler's
bookkeeping of a range and the ops inside costs as much as a small kernel, and not the same everywhere
(4.7 us a node in a bare loop, about 26 us inside a compiled training step, measured here), so it
cannot be taken off reliably. Also on a CPU, freeing a node's output is part of its cost (a large free
can hand pages back to the kernel, as dear as computing them): the interpreter frees each value after
its last use itself, times the free and adds it to the producer's time. Only op-by-op graphs
(``codegen="eager"``) have a time per node, since Inductor fuses nodes into kernels. After the N calls
the graph runs as compiled, at full speed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.fx

__all__ = ["NodeTimer"]

_PREFIX = "memopt_node::"


class _Timed(torch.fx.Interpreter):
    """Times each call node (``seconds``; on CUDA also a named profiler range) and frees values itself,
    charging each free to the value's producer."""

    def __init__(self, gm: torch.fx.GraphModule, *, ranges: bool) -> None:
        super().__init__(gm, garbage_collect_values=True)    # computes user_to_last_uses
        self.garbage_collect_values = False                   # run_node frees instead
        self.ranges = ranges
        self.seconds: dict[str, float] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.op != "call_function":
            result = super().run_node(n)
        else:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            start = time.perf_counter()          # the call alone: not the interpreter's own work
            if self.ranges:
                with torch.profiler.record_function(_PREFIX + n.name):
                    result = n.target(*args, **kwargs)  # type: ignore[operator]
            else:
                result = n.target(*args, **kwargs)  # type: ignore[operator]
            self.seconds[n.name] = self.seconds.get(n.name, 0.0) + time.perf_counter() - start
            del args, kwargs
        for value in self.user_to_last_uses.get(n, []):
            start = time.perf_counter()
            del self.env[value]
            self.seconds[value.name] = self.seconds.get(value.name, 0.0) + time.perf_counter() - start
        return result


class NodeTimer:
    """Runs ``run`` (the compiled graph, boxed calling convention) after ``steps`` timed op-by-op calls
    of ``gm``; ``done(seconds by node name, device)`` gets the median times when the last one returns."""

    def __init__(self, gm: torch.fx.GraphModule, run: Callable[[list[Any]], Any], steps: int,
                 done: Callable[[dict[str, float], torch.device], None]) -> None:
        self.gm, self.run, self.steps, self.done = gm, run, steps, done
        self.times: dict[str, list[float]] = {}
        self._boxed_call = True

    def __call__(self, args: list[Any]) -> Any:
        if self.steps <= 0:
            return self.run(args)
        device = next((a.device for a in args if isinstance(a, torch.Tensor) and a.is_cuda), torch.device("cpu"))
        inputs = list(args)
        args.clear()          # boxed: the caller's list no longer holds the inputs
        interpreter = _Timed(self.gm, ranges=device.type == "cuda")
        if device.type == "cuda":
            out, seconds = _on_device(interpreter, inputs)
        else:
            out, seconds = interpreter.run(*inputs), interpreter.seconds
        del inputs
        calls = {n.name for n in self.gm.graph.nodes if n.op == "call_function"}
        for name, value in seconds.items():
            if name in calls:
                self.times.setdefault(name, []).append(value)
        self.steps -= 1
        if self.steps == 0:
            self.done({name: statistics.median(ts) for name, ts in self.times.items()}, device)
        return out


def _on_device(interpreter: _Timed, inputs: list[Any]) -> tuple[Any, dict[str, float]]:
    """Run under torch's profiler; each node's device time is that of the kernels in its range."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = interpreter.run(*inputs)
        torch.cuda.synchronize()
    seconds = {e.name.removeprefix(_PREFIX): float(e.device_time_total) * 1e-6
               for e in prof.events() if e.name.startswith(_PREFIX)}
    return out, seconds
