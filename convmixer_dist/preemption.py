"""Stop signals: SIGTERM (what Slurm, Kubernetes and most schedulers send before killing a job),
SIGUSR1 (Slurm's `--signal=USR1@SECONDS`) and SIGINT (Ctrl-C).

What happens, by phase (the command line; see `install_signal_thread`):
- Before anything is written (imports, strategy start-up, data loading): the process exits at once,
  one line, code 75 (SIGTERM/SIGUSR1: rerun to start) or 130 (Ctrl-C). Nothing is left behind.
- While training: the run stops at the next step boundary, *inside* the multi-step `tf.function`
  call (the loop reads a stop flag before every step; all replicas and workers agree on it), saves
  a checkpoint and exits with code 75 (preempted, rerun to resume) or 130 (Ctrl-C), one line. The
  bound is one training step, plus the evaluation or checkpoint save in progress if the signal
  arrives during one, plus the save itself.
- A second Ctrl-C exits at once (code 130, one line); the last checkpoint is kept.

Why a thread: Python runs signal handlers only in the main thread between bytecodes, so while that
thread waits in a long TensorFlow call a handler would run only after the call. `block_signals`
blocks the signals in every thread (before TensorFlow starts its own), and `install_signal_thread`
(once the strategy exists) receives them in a dedicated thread with `sigwait`, which sets the stop
flag (a tf.Variable) while the call runs.
In-process use without that thread (tests, notebooks) falls back to ordinary handlers: the run then
stops after the current call.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
SIGNALS = (*STOP_SIGNALS, signal.SIGINT)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: rerun to resume.
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C.


class _State:
    """Process-wide: what was received, whether anything was written yet, the in-graph flag."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.signum: int | None = None
        self.interrupts = 0
        self.writing = False  # Set once the run may write files: from then on stop cleanly.
        self.flag = None  # tf.Variable read by the training loop before every step.
        self.thread: threading.Thread | None = None
        self.stderr_fd: int | None = None  # A duplicate of stderr for messages from the thread.
        self.managed = False  # block_signals() was called: the thread takes the signals.


STATE = _State()


def exit_code() -> int:
    """75 for SIGTERM/SIGUSR1, 130 for Ctrl-C."""
    return EXIT_INTERRUPTED if STATE.signum == signal.SIGINT else EXIT_PREEMPTED


def _record(signum: int) -> None:
    """Note a stop request and raise the in-graph flag (any thread)."""
    with STATE.lock:
        if signum == signal.SIGINT:
            STATE.interrupts += 1
        if STATE.signum is None or signum == signal.SIGINT:
            STATE.signum = signum
        flag = STATE.flag
    if flag is not None:
        flag.assign(1)


def _exit_now(message: str, code: int) -> None:
    from convmixer_dist import rundir

    # The saved descriptor: stderr itself may be pointed at /dev/null right now (runtime.py silences
    # TensorFlow's import-time logs that way).
    os.write(STATE.stderr_fd if STATE.stderr_fd is not None else 2, (message + "\n").encode())
    rundir.release_all_locks()
    os._exit(code)  # noqa: SLF001 - the main thread may be inside TensorFlow; no cleanup can run there


def _receive(signals: set) -> None:
    while True:
        signum = signal.sigwait(signals)
        with STATE.lock:
            writing = STATE.writing
            second_interrupt = signum == signal.SIGINT and STATE.interrupts >= 1
        if second_interrupt:
            _exit_now("interrupted again: exiting now without a checkpoint (the last one is kept)",
                      EXIT_INTERRUPTED)
        if not writing:
            name = "interrupted" if signum == signal.SIGINT else "preempted"
            _exit_now(f"{name}: stopped by {signal.Signals(signum).name} before training started; "
                      "nothing was written", EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_PREEMPTED)
        _record(signum)  # The run reports the outcome in one line when it has saved.


def block_signals() -> None:
    """Keep SIGTERM/SIGUSR1/SIGINT pending (in this thread and every thread created later) until
    `install_signal_thread` takes them. Call it before TensorFlow is imported: its threads inherit
    the mask, so TensorFlow's own SIGTERM handler never sees the signals."""
    sys.stderr.flush()
    if STATE.stderr_fd is None:
        STATE.stderr_fd = os.dup(2)
    signal.pthread_sigmask(signal.SIG_BLOCK, set(SIGNALS))
    STATE.managed = True


def signals_managed() -> bool:
    """True when this process's stop signals are (or will be) taken by the stop-signal thread."""
    return STATE.managed


def install_signal_thread() -> None:
    """Receive SIGTERM/SIGUSR1/SIGINT in a dedicated thread (see the module docstring); a signal
    that arrived since `block_signals` is taken at once. Start it after the strategy exists (during
    multi-worker start-up, startup.py polls the pending signals itself)."""
    if STATE.thread is not None:
        return
    block_signals()
    STATE.thread = threading.Thread(target=_receive, args=(set(SIGNALS),), name="stop-signals",
                                    daemon=True)
    STATE.thread.start()


class Stopped(RuntimeError):
    """A stop signal ended the run: before anything was written, or after a checkpoint was saved at
    the step in the message."""


class StopSignal:
    """A run's stop requests, one object for both places that check them: `local_flag()` inside the
    training loop's tf.function (summed with every step's bookkeeping) and `requested()` on the host
    (after each call). Both are cross-worker decisions, so every worker stops at the same step.

    Create it after the strategy (MultiWorkerMirroredStrategy must exist before any op) and enter it
    once the run may write: a stop request that arrived before raises `Stopped` (nothing written).
    Without the signal thread (in-process runs) every run starts with no stop request, and ordinary
    handlers record SIGTERM/SIGUSR1 while it is entered (honoured after the current call).
    """

    def __init__(self, strategy):
        import tensorflow as tf

        self.strategy = strategy
        self._previous: dict = {}
        self._multi_worker = strategy.extended._in_multi_worker_mode()  # noqa: SLF001 - public in effect
        with STATE.lock:
            if STATE.flag is None:  # One flag per process: the signal thread raises it.
                STATE.flag = tf.Variable(0, dtype=tf.int32, trainable=False, name="stop_requested")
            self.flag = STATE.flag
        if self._multi_worker:
            self._agree = tf.function(self._sum_over_workers)

    def __enter__(self) -> "StopSignal":
        with STATE.lock:
            if STATE.thread is None:
                STATE.signum, STATE.interrupts = None, 0
            if STATE.signum is not None:
                raise Stopped(f"stopped by {signal.Signals(STATE.signum).name} before training "
                              "started; nothing was written")
            STATE.writing = True
            self.flag.assign(0)
        if STATE.thread is None and threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:  # In-process fallback: honoured after the current call.
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    @staticmethod
    def _handle(signum, frame) -> None:  # noqa: ARG004 - signal handler signature
        _record(signum)

    def _sum_over_workers(self, value):
        import tensorflow as tf

        per_replica = self.strategy.run(lambda: tf.identity(value))
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    def local_flag(self):
        """For the inside of the training loop's tf.function: this worker's stop request as 0.0 or
        1.0. The loop sums it over all replicas together with the step's bookkeeping (one
        collective per step), so every worker decides on the same sum and stops after the same step."""
        import tensorflow as tf

        return tf.cast(self.flag.read_value() > 0, tf.float32)

    def requested(self) -> bool:
        """On the host: True on every worker once any worker has received a stop signal."""
        import tensorflow as tf

        local = 1.0 if STATE.signum is not None else 0.0
        if not self._multi_worker:
            return bool(local)
        return bool(self._agree(tf.constant(local)) > 0)
