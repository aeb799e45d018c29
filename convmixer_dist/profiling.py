"""TensorBoard profiles of a window of training steps (`--profile_steps=START,END`) and the
profiler server for on-demand capture (`--profiler_port`).

The profile lands in MODEL_DIR/plugins/profile/<run>/<host>.xplane.pb, so `tensorboard --logdir
MODEL_DIR` shows it under the Profile tab. Every loop call (including its `next(iterator)`) runs
under a `Trace("train", step_num=..., _r=1)` step marker, so the overview page shows per-step time.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from convmixer_dist.errors import UsageError


def parse_profile_steps(text: str) -> tuple[int, int] | None:
    """"" -> None; "START,END" (0 <= START < END) -> (START, END); anything else a UsageError."""
    if not text:
        return None
    try:
        start, end = (int(part) for part in text.split(","))
    except ValueError:
        start, end = -1, -1
    if not 0 <= start < end:
        raise UsageError(f"--profile_steps={text!r}: expected START,END with 0 <= START < END (e.g. 10,20)")
    return start, end


class ProfileWindow:
    """Starts the profiler when the step reaches START and stops it once END is passed."""

    def inside(self, step: int) -> bool:
        """True while `step` (0-based, the next step to run) lies in the window."""
        return self.enabled and self.steps[0] <= step < self.steps[1]

    def __init__(self, logdir: str, steps: tuple[int, int] | None, host_tracer_level: int = 2,
                 python_tracer_level: int = 0, enabled: bool = True):
        self.logdir, self.steps, self.enabled = logdir, steps, enabled and steps is not None
        self.host_tracer_level, self.python_tracer_level = host_tracer_level, python_tracer_level
        self.active = False

    @contextlib.contextmanager
    def step(self, step_num: int, num_steps: int = 1) -> Iterator[None]:
        """Wrap one training loop call running steps step_num+1 .. step_num+num_steps."""
        import tensorflow as tf

        if not self.enabled:
            yield
            return
        start, end = self.steps
        if not self.active and start <= step_num < end:
            options = tf.profiler.experimental.ProfilerOptions(
                host_tracer_level=self.host_tracer_level, python_tracer_level=self.python_tracer_level,
                device_tracer_level=1)
            tf.profiler.experimental.start(self.logdir, options=options)
            self.active = True
        if self.active:
            with tf.profiler.experimental.Trace("train", step_num=step_num, _r=1):
                yield
        else:
            yield
        if self.active and step_num + num_steps >= end:
            self.close()

    def close(self) -> None:
        """Stop the profiler if it is running (writes the .xplane.pb)."""
        if self.active:
            import tensorflow as tf

            tf.profiler.experimental.stop()
            self.active = False


def check_profile_window(steps: tuple[int, int] | None, total_steps: int) -> str | None:
    """UsageError when --profile_steps starts at or after the run's last step (nothing would be
    captured); a warning line when it ends after it (the profile stops at the last step)."""
    if steps is None:
        return None
    start, end = steps
    if start >= total_steps:
        raise UsageError(f"--profile_steps={start},{end}: the run has {total_steps} steps, so nothing "
                         f"would be profiled; expected START < {total_steps}")
    if end > total_steps:
        return (f"warning: --profile_steps={start},{end} ends after the run's {total_steps} steps; "
                f"profiling steps {start}..{total_steps}")
    return None


def check_window_after_resume(steps: tuple[int, int] | None, resumed_step: int) -> str | None:
    """A warning line when a run resumed at `resumed_step` has already passed (part of) the
    --profile_steps window: the steps before it are not run again, so they cannot be profiled."""
    if steps is None or resumed_step <= steps[0]:
        return None
    start, end = steps
    if resumed_step >= end:
        return (f"warning: --profile_steps={start},{end}: the run resumed at step {resumed_step}, after "
                f"the window; nothing is profiled (pick steps after {resumed_step})")
    return (f"warning: --profile_steps={start},{end}: the run resumed at step {resumed_step}; "
            f"profiling steps {resumed_step}..{end}")


def check_port_free(port: int) -> None:
    """UsageError if another process listens on `port`: TensorFlow's profiler server would fail
    silently there (no error, no server). Checked before anything is written."""
    import socket

    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            probe = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # No IPv6 on this host.
        with probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no conflict
            try:
                probe.bind((host, port))
            except OSError as err:
                if family == socket.AF_INET6 and err.errno != 98:  # EADDRNOTAVAIL etc.: no IPv6
                    continue
                raise UsageError(f"--profiler_port={port}: the port is in use by another process "
                                 f"({err.strerror}); pick a free port") from None


def start_profiler_server(port: int) -> None:
    """Serve on-demand captures (TensorBoard's "Capture profile" button, grpc://HOST:PORT)."""
    import tensorflow as tf

    tf.profiler.experimental.server.start(port)
