"""The depthwise-conv micro-benchmark: a real tiny grid through the CLI, its FLOP/byte model,
unsupported points recorded rather than fatal, and one-line errors for bad flags."""
import csv
import glob
import json
import os

import pytest

from convmixer_dist.errors import UsageError
from convmixer_dist.perf.kernel_bench import (Point, depthwise_bytes, depthwise_flops, grid,
                                              parse_choice_list, parse_int_list, run_point)
from helpers import run_cli


def test_tiny_grid_end_to_end_with_profile(tmp_path):
    result = run_cli("convmixer_dist.perf.kernel_bench", "--kernel_sizes=3,5", "--hidden_dims=8",
                     "--batch_sizes=2", "--spatial=8", "--dtypes=float32", "--data_formats=NHWC,NCHW",
                     "--xla=off", "--iters=2", "--warmup=1", f"--output_dir={tmp_path}", "--profile")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "kernel_bench.json").read_text())
    assert report["device"] == "/CPU:0" and report["tf_version"] and report["cpu_cores"] >= 1
    rows = report["rows"]
    # 2 kernel sizes x 2 formats x 2 passes, in flag order.
    assert [(r["kernel_size"], r["data_format"], r["pass"]) for r in rows] == [
        (k, fmt, p) for k in (3, 5) for fmt in ("NHWC", "NCHW") for p in ("forward", "forward_backward")]
    for row in rows:
        point = Point(row["kernel_size"], 8, 2, 8, "float32", row["data_format"], "off", row["pass"])
        assert row["flops"] == depthwise_flops(point) and row["bytes"] == depthwise_bytes(point)
        # NHWC runs everywhere; whether NCHW has a CPU kernel depends on the machine and the
        # TensorFlow build, so it may be a row with the reason instead.
        if row["data_format"] == "NCHW" and row["status"].startswith("unsupported: "):
            continue
        assert row["status"] == "ok", row
        assert row["time_ms"] > 0 and row["min_ms"] <= row["time_ms"]
        assert row["gflops"] > 0 and row["gb_s"] > 0
        assert row["gflops"] == pytest.approx(row["flops"] / row["time_ms"] / 1e6)
    with open(tmp_path / "kernel_bench.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    # An unsupported point has no time: an empty CSV cell, null in the JSON.
    assert [(int(r["kernel_size"]), r["data_format"], r["pass"], r["status"],
             float(r["time_ms"]) if r["time_ms"] else None)
            for r in csv_rows] == [(r["kernel_size"], r["data_format"], r["pass"], r["status"], r["time_ms"])
                                   for r in rows]
    profiles = glob.glob(str(tmp_path / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert len(profiles) == 1
    raw = open(profiles[0], "rb").read()
    assert b"DepthwiseConv2dNative" in raw and b"kernel" in raw
    assert f"tensorboard --logdir {tmp_path}" in result.stdout
    assert not glob.glob(str(tmp_path / "*.tmp"))  # Atomic writes leave no temporary files.


def test_unsupported_point_becomes_a_row_with_the_reason(monkeypatch):
    # Which points a CPU or TensorFlow build supports varies by machine; the failure is injected
    # (as TensorFlow raises it for a missing kernel) so the test means the same everywhere.
    import tensorflow as tf

    from convmixer_dist.perf import kernel_bench

    def no_kernel(point, device):
        raise tf.errors.UnimplementedError(None, None, "No kernel for this point\n\t [[{{node x}}]]")

    monkeypatch.setattr(kernel_bench, "build", no_kernel)
    row = run_point(Point(3, 4, 1, 4, "float16", "NCHW", "off", "forward"), warmup=1, iters=1)
    assert row["status"] == "unsupported: No kernel for this point"
    assert row["time_ms"] is None and row["gflops"] is None and row["flops"] == 2 * 1 * 4 * 4 * 4 * 9


def test_depthwise_flops_and_bytes_match_the_hand_formula():
    point = Point(7, 256, 64, 16, "float32", "NHWC", "off", "forward")
    assert depthwise_flops(point) == 2 * 64 * 16 * 16 * 256 * 7 * 7 == 411_041_792
    fwd_bwd = Point(7, 256, 64, 16, "bfloat16", "NHWC", "on", "forward_backward")
    assert depthwise_flops(fwd_bwd) == 3 * 411_041_792
    acts, kernel = 64 * 16 * 16 * 256, 7 * 7 * 256
    assert depthwise_bytes(point) == 4 * (2 * acts + kernel)
    assert depthwise_bytes(fwd_bwd) == 2 * (5 * acts + 3 * kernel)


def test_grid_is_the_product_in_flag_order():
    points = grid([3, 9], [8], [2], [4, 8], ["float32"], ["NHWC"], ["off", "on"], ["forward"])
    assert len(points) == 8
    assert points[0] == Point(3, 8, 2, 4, "float32", "NHWC", "off", "forward")
    assert points[-1] == Point(9, 8, 2, 8, "float32", "NHWC", "on", "forward")


def test_list_parsing():
    assert parse_int_list("kernel_sizes", "3,5,31", 1, 31) == [3, 5, 31]
    for bad in ("3,x", "0", "32", "", "3,,5", "-3"):
        with pytest.raises(UsageError, match="--kernel_sizes"):
            parse_int_list("kernel_sizes", bad, 1, 31)
    assert parse_choice_list("data_formats", "NCHW,NHWC", ("NHWC", "NCHW")) == ["NCHW", "NHWC"]
    with pytest.raises(UsageError, match="--dtypes"):
        parse_choice_list("dtypes", "float32,int8", ("float32", "bfloat16", "float16"))


def test_bad_flag_is_one_error_line_and_exit_code_2(tmp_path):
    result = run_cli("convmixer_dist.perf.kernel_bench", "--kernel_sizes=3,x", f"--output_dir={tmp_path}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--kernel_sizes" in lines[0], lines
    assert "Traceback" not in result.stderr and not os.listdir(tmp_path)


def test_unwritable_output_dir_is_refused_before_any_point_runs(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep")
    proc = run_cli("convmixer_dist.perf.kernel_bench", "--kernel_sizes=3", f"--output_dir={blocker}/kb")
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: --output_dir={blocker}/kb: ") and "cannot be created" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "points on" not in proc.stdout
    assert blocker.read_text() == "keep"
