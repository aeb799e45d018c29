"""Wall-clock timing shared by the performance tools: untimed warm-up calls, then timed calls.

The first calls of a step trace and compile it (and tf.data autotunes), so every tool discards
`warmup` calls and times each of the next `repeats` calls on its own; the tools report the median.
Runs compared with each other alternate their calls (`time_alternating`), so a change in the
machine's load hits all of them alike.
"""
from __future__ import annotations

import time
from typing import Callable, Optional


def time_alternating(runs: dict[str, Callable[[], object]], warmup: int, repeats: int,
                     progress: bool = True) -> dict[str, list[float]]:
    """{name: wall seconds of each of `repeats` calls} after `warmup` untimed calls of every run; the
    runs take turns call by call. With `progress`, one line per timed call."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
            if progress:
                print(f"  {name}: window {i + 1}/{repeats} {seconds[name][-1]:.3f} s", flush=True)
    return seconds


def time_calls(run: Callable[[], object], warmup: int, repeats: int,
               label: Optional[str] = None) -> list[float]:
    """Wall seconds of each of `repeats` calls of `run` after `warmup` untimed calls; with `label`,
    one progress line per timed call."""
    return time_alternating({label or "": run}, warmup, repeats, progress=label is not None)[label or ""]
