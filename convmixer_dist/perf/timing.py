"""Wall-clock timing shared by the performance tools: untimed warm-up calls, then timed calls.

The first calls of a step trace and compile it (and tf.data autotunes), so every tool discards
`warmup` calls and times each of the next `repeats` calls on its own; the tools report the median.
"""
from __future__ import annotations

import time
from typing import Callable, Optional


def time_calls(run: Callable[[], object], warmup: int, repeats: int,
               label: Optional[str] = None) -> list[float]:
    """Wall seconds of each of `repeats` calls of `run` after `warmup` untimed calls; with `label`,
    one progress line per timed call."""
    for _ in range(warmup):
        run()
    seconds = []
    for i in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
        if label:
            print(f"  {label}: window {i + 1}/{repeats} {seconds[-1]:.3f} s", flush=True)
    return seconds
