"""The perf tools' own arguments have bounds like Config settings (flags.define_number), tools'
arguments that make no sense together are refused, an out-of-memory grid point is a row, and a
resumed run says when its --profile_steps window is already past. Command lines run batched in one
process tree (tests/command_driver.py)."""
import json
import os

import pytest
from absl import flags

from convmixer_dist import flags as cli
from convmixer_dist.profiling import check_window_after_resume
from test_error_boundary import TINY_RUN, run_batch

BENCH = ["--hidden_dim=16", "--depth=2", "--kernel_size=3", "--patch_size=2", "--image_size=8",
         "--num_classes=4", "--global_batch_size=16", "--steps_per_loop=2", "--window_steps=4",
         "--windows=2", "--synthetic_train_size=256"]


def test_define_number_bounds_integers_and_finite_floats():
    values = flags.FlagValues()
    cli.define_number("windows", 5, 1, 1000, "Timed windows", flag_values=values)
    cli.define_number("peak", 0.0, 0.0, 1e6, "Peak TFLOP/s", flag_values=values)
    for argv, message in ((["--windows=0"], "not an integer in the range [1, 1000]"),
                          (["--windows=1001"], "not an integer in the range [1, 1000]"),
                          (["--peak=-1"], "not a number in the range [0.0, 1000000.0]"),
                          (["--peak=nan"], "--peak must be a finite number"),
                          (["--peak=inf"], "not a number in the range")):
        values.unparse_flags()
        with pytest.raises(flags.Error, match=message.replace("[", r"\[").replace("]", r"\]")):
            values(["tool", *argv])
    values.unparse_flags()
    values(["tool", "--windows=3", "--peak=2.5"])
    assert (values.windows, values.peak) == (3, 2.5)
    assert "(1..1000)" in values["windows"].help  # --help states the interval


def test_tools_arguments_out_of_bounds_or_not_fitting_together_are_one_line(tmp_path):
    out = f"--output={tmp_path}/r.json"
    cases = [  # (module, arguments, the flag the one line names)
        ("convmixer_dist.perf.benchmark", [*BENCH, "--compare_fit", "--fit_steps_per_execution=0", out],
         "--fit_steps_per_execution=0"),
        ("convmixer_dist.perf.benchmark", [*BENCH, "--variants=kernels=keras,kernels=keras", out],
         "'kernels=keras' is the same variant as 'kernels=keras'"),
        ("convmixer_dist.perf.benchmark", [*BENCH, "--variants=steps_per_loop=2,steps_per_loop=02", out],
         "'steps_per_loop=02' is the same variant as 'steps_per_loop=2'"),  # the same value
        ("convmixer_dist.perf.benchmark", [*BENCH, "--windows=0", out], "--windows=0"),
        ("convmixer_dist.perf.benchmark", [*BENCH, "--warmup_windows=-1", out], "--warmup_windows=-1"),
        ("convmixer_dist.perf.benchmark", [*BENCH, "--peak_tflops=nan", out], "--peak_tflops"),
        ("convmixer_dist.perf.augment_benchmark", ["--batch_size=0", out], "--batch_size=0"),
        ("convmixer_dist.perf.augment_benchmark", ["--batches=-3", out], "--batches=-3"),
        ("convmixer_dist.perf.kernel_bench", ["--iters=0", f"--output_dir={tmp_path}/k"], "--iters=0"),
        ("convmixer_dist.perf.kernel_bench", ["--warmup=-1", f"--output_dir={tmp_path}/k"], "--warmup=-1"),
        ("convmixer_dist.perf.profile_report", [str(tmp_path), "--top=0"], "--top=0"),
        ("convmixer_dist.perf.profile_report", [str(tmp_path), "--peak_gbps=-1"], "--peak_gbps=-1"),
    ]
    results = run_batch([{"module": module, "argv": argv} for module, argv, _ in cases])
    for (module, argv, named), result in zip(cases, results):
        lines = result["stderr"].splitlines()
        assert result["code"] == 2 and len(lines) == 1 and lines[0].startswith("error: "), (argv, result)
        assert named in lines[0], (argv, lines)
    assert not os.path.exists(tmp_path / "r.json") and not os.path.exists(tmp_path / "k")


def test_an_out_of_memory_grid_point_is_a_row_and_the_grid_goes_on(monkeypatch, tmp_path):
    """The allocation failure is injected (as TensorFlow raises it), not a real allocation."""
    import tensorflow as tf

    from convmixer_dist.perf import kernel_bench

    real_build = kernel_bench.build

    def build(point, device):
        if point.hidden_dim == 8:
            def fn(*args):
                raise tf.errors.ResourceExhaustedError(
                    None, None, "OOM when allocating tensor with shape[1024,65536,32,32]\n\t [[{{node x}}]]")
            return fn, ()
        return real_build(point, device)

    monkeypatch.setattr(kernel_bench, "build", build)
    opts = type("Opts", (), dict(kernel_sizes="3", hidden_dims="8,4", batch_sizes="1", spatial="4",
                                 dtypes="float32", data_formats="NHWC", xla="off", passes="forward",
                                 warmup=1, iters=1, output_dir=str(tmp_path), profile=False, device="/CPU:0"))
    kernel_bench.main([], opts)
    rows = json.loads((tmp_path / "kernel_bench.json").read_text())["rows"]
    assert [row["hidden_dim"] for row in rows] == [8, 4]  # the point after it still ran
    assert rows[0]["status"] == "out of memory: OOM when allocating tensor with shape[1024,65536,32,32]"
    assert rows[0]["time_ms"] is None and rows[1]["status"] == "ok" and rows[1]["time_ms"] > 0


def test_a_resumed_run_past_its_profile_window_says_so(tmp_path):
    assert check_window_after_resume((0, 2), 0) is None and check_window_after_resume(None, 5) is None
    assert "profiling steps 3..6" in check_window_after_resume((2, 6), 3)
    run = str(tmp_path / "run")
    base = [a for a in TINY_RUN if not a.startswith("--train_steps")]
    first, resumed = run_batch([
        {"module": "convmixer_dist.main", "argv": [*base, "--train_steps=2", f"--model_dir={run}"]},
        {"module": "convmixer_dist.main", "argv": [*base, "--train_steps=4", "--profile_steps=0,2",
                                                   f"--model_dir={run}"]}])
    assert first["code"] == 0 and resumed["code"] == 0, (first, resumed)
    assert ("warning: --profile_steps=0,2: the run resumed at step 2, after the window; nothing is "
            "profiled (pick steps after 2)") in resumed["stdout"], resumed
    assert not os.path.exists(os.path.join(run, "plugins", "profile"))
