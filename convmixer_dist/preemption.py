"""Preemption: SIGTERM (what Slurm, Kubernetes and most schedulers send before killing a job) or
SIGUSR1 (Slurm's `--signal=USR1@SECONDS`) asks the run to save a checkpoint at the next step boundary
and exit with code 75 (`main.EXIT_PREEMPTED`), so a requeue resumes it with nothing lost.

In multi-worker runs only some workers may receive the signal; `should_stop` all-reduces the flag so
every worker stops (and takes part in the save) at the same step.
"""
from __future__ import annotations

import signal

import tensorflow as tf

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionWatcher:
    """Records termination signals; `should_stop()` is the cross-worker decision."""

    def __init__(self, strategy: tf.distribute.Strategy):
        self.strategy = strategy
        self.received: int | None = None
        self._previous = {}
        self._multi_worker = strategy.extended._in_multi_worker_mode()  # noqa: SLF001 - public in effect
        if self._multi_worker:
            self._agree = tf.function(self._all_workers_flag)

    def __enter__(self) -> "PreemptionWatcher":
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.received = signum

    def _all_workers_flag(self, flag):
        per_replica = self.strategy.run(lambda: tf.identity(flag))
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    def should_stop(self) -> bool:
        """True on every worker once any worker has received a termination signal."""
        local = 1.0 if self.received is not None else 0.0
        if not self._multi_worker:
            return bool(local)
        return bool(self._agree(tf.constant(local)) > 0)
