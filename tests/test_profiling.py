"""Profile capture of a training window: a real .xplane.pb under MODEL_DIR/plugins/profile."""
import contextlib
import glob
import io
import os
import socket
import subprocess
import sys
import time

import pytest

from convmixer_dist import strategy as strategy_lib
from convmixer_dist.training.loop import train_and_evaluate
from convmixer_dist.errors import UsageError
from convmixer_dist.profiling import parse_profile_steps
from helpers import ROOT, tiny_config


def test_parse_profile_steps():
    assert parse_profile_steps("") is None
    assert parse_profile_steps("3,5") == (3, 5)
    for bad in ("5,3", "3", "a,b", "-1,2", "1,2,3"):
        with pytest.raises(UsageError, match="--profile_steps"):
            parse_profile_steps(bad)


def test_training_captures_a_profile_with_conv_kernels(tmp_path):
    config = tiny_config(str(tmp_path), train_steps=9, steps_per_loop=3, profile_steps="3,6")
    with contextlib.redirect_stdout(io.StringIO()):
        summary = train_and_evaluate(config, strategy_lib.create_strategy(config))
    assert summary["steps"] == 9
    profiles = glob.glob(str(tmp_path / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert len(profiles) == 1 and os.path.getsize(profiles[0]) > 10_000
    raw = open(profiles[0], "rb").read()
    # The trace holds the model's kernels under their layer names and the step markers.
    assert b"block00_depthwise_conv" in raw and b"block00_pointwise_conv" in raw
    assert b"DepthwiseConv2dNative" in raw


def test_profiler_server_listens_on_the_requested_port(tmp_path):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    code = ("import time; from convmixer_dist.profiling import start_profiler_server; "
            f"start_profiler_server({port}); print('up', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        deadline = time.time() + 20
        while True:
            try:
                socket.create_connection(("localhost", port), timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline, "profiler server never listened"
                time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    # Stopped with its process: nothing listens on the port any more (SO_REUSEADDR: a TIME_WAIT
    # left by the probe connection does not count, a listening socket still would).
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("localhost", port))


def test_a_profile_window_beyond_the_run_is_an_error_or_a_warning():
    from convmixer_dist.errors import UsageError
    from convmixer_dist.profiling import check_profile_window

    assert check_profile_window(None, 2) is None and check_profile_window((0, 2), 2) is None
    with pytest.raises(UsageError, match=r"--profile_steps=100,200: the run has 2 steps"):
        check_profile_window((100, 200), 2)  # nothing would be captured: refused before training
    warning = check_profile_window((1, 200), 2)  # truncated: profiled up to the last step
    assert warning.startswith("warning: --profile_steps=1,200 ends after the run's 2 steps")
