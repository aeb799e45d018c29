"""The benchmark command end to end on a tiny model, and its pure helpers."""
import json

import pytest

from convmixer_dist.perf import benchmark, flops
from helpers import run_cli

TINY = ["--hidden_dim=16", "--depth=2", "--kernel_size=3", "--patch_size=2", "--image_size=8",
        "--num_classes=4", "--global_batch_size=16", "--steps_per_loop=2", "--window_steps=4",
        "--windows=3", "--synthetic_train_size=256"]


def test_median_rate_and_throughput_fields():
    rate = benchmark.median_rate([2.0, 1.0, 4.0], images_per_window=100)
    assert rate["images_per_sec"] == 50.0 and rate["images_per_sec_min"] == 25.0
    fields = benchmark.throughput_fields(rate, global_batch=10, train_flops=2e10, peak=4.0)
    assert fields["step_time_ms"] == pytest.approx(200.0)
    assert fields["achieved_tflops"] == pytest.approx(1.0) and fields["mfu"] == pytest.approx(0.25)
    assert benchmark.throughput_fields(rate, 10, 2e10, None)["mfu"] is None
    both = benchmark.throughput_fields(rate, 10, 2e10, peak=4.0, measured_peak=2.0)
    assert both["mfu"] == pytest.approx(0.25) and both["mfu_measured"] == pytest.approx(0.5)
    assert both["peak_measured_tflops"] == 2.0 and fields["mfu_measured"] is None


def test_benchmark_all_runs_on_two_replicas_write_valid_json(tmp_path):
    out = tmp_path / "bench" / "result.json"
    proc = run_cli("convmixer_dist.perf.benchmark", *TINY, "--strategy=mirrored", "--cpu_replicas=2",
                   "--measure=all", "--compare_fit", "--peak_tflops=0.5", f"--output={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["setup"]["replicas"] == 2 and result["setup"]["precision"] == "float32"
    assert result["flops_per_image_forward"] == flops.convmixer_flops(16, 2, 3, 2, 8, 4)
    assert result["flops_per_image_train"] == 3 * result["flops_per_image_forward"]
    runs = result["runs"]
    assert set(runs) == {"custom_input_excluded", "custom_input_included", "fit_input_excluded"}
    for run in runs.values():
        assert len(run["window_images_per_sec"]) == 3 and run["images_per_sec"] > 0
        assert run["mfu"] == pytest.approx(run["achieved_tflops"] / 0.5)
        assert run["mfu_measured"] is None  # --peak_tflops overrides the measured peak too
        assert run["achieved_tflops"] == pytest.approx(
            run["images_per_sec"] * result["flops_per_image_train"] / 1e12)
    assert result["custom_over_fit"] == pytest.approx(
        runs["custom_input_excluded"]["images_per_sec"] / runs["fit_input_excluded"]["images_per_sec"])
    assert result["input_pipeline"]["images_per_sec_per_core"] > 0
    assert "custom loop / model.fit:" in proc.stdout and f"Saved {out}" in proc.stdout


def test_variants_rerun_the_custom_loop_with_one_setting_changed(tmp_path):
    out = tmp_path / "variants.json"
    proc = run_cli("convmixer_dist.perf.benchmark", *TINY, "--windows=2", "--pipeline=excluded",
                   "--variants=precision=mixed_bfloat16,steps_per_loop=4,kernels=keras", f"--output={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    bf16 = result["runs"]["custom_input_excluded[precision=mixed_bfloat16]"]
    assert bf16["precision"] == "mixed_bfloat16" and bf16["images_per_sec"] > 0
    assert result["runs"]["custom_input_excluded"]["images_per_sec"] > 0
    ratios = result["variant_over_base"]
    assert set(ratios) == {"precision=mixed_bfloat16", "steps_per_loop=4", "kernels=keras"}
    assert result["setup"]["kernels"] == "fused_bn+exact_gelu+folded_depthwise"  # auto on CPU
    assert result["runs"]["custom_input_excluded[kernels=keras]"]["kernels"] == "keras"
    # No --peak_tflops: float32 on CPU gets the computed vector peak, so every line has an MFU.
    assert "fp32 lanes" in result["peak_source"] and result["peak_tflops"] > 0
    assert result["runs"]["custom_input_excluded"]["mfu"] > 0 and "MFU" in proc.stdout
    # ... and the peak measured once per precision, with an MFU against it beside the nominal one.
    measured = result["peak_measured"]
    assert set(measured) == {"float32", "mixed_bfloat16"} and measured["float32"]["tflops"] > 0
    base = result["runs"]["custom_input_excluded"]
    assert base["mfu_measured"] == pytest.approx(base["achieved_tflops"] / measured["float32"]["tflops"])
    assert bf16["mfu_measured"] == pytest.approx(bf16["achieved_tflops"] / measured["mixed_bfloat16"]["tflops"])
    assert bf16["mfu"] is None  # the float32 formula says nothing about a bfloat16 run
    assert "measured peak (float32" in proc.stdout and "measured" in proc.stdout
    assert ratios["precision=mixed_bfloat16"] == pytest.approx(
        bf16["images_per_sec"] / result["runs"]["custom_input_excluded"]["images_per_sec"])


@pytest.mark.parametrize("args, flag", [
    (["--variants=precision=fp8"], "--variants"),
    (["--variants=steps_per_loop=3"], "--variants"),
    (["--window_steps=3"], "--window_steps"),
    (["--pipeline=excluded,bogus"], "--pipeline"),
    (["--compare_fit", "--augment_on_device", "--augment=rrc"], "--compare_fit"),
    (["--measure=input", "--input_compare=tfrecord"], "--input_compare"),
    (["--input_compare=decode_crop=true"], "--input_compare"),
])
def test_bad_benchmark_flags_are_one_line_errors(tmp_path, args, flag):
    proc = run_cli("convmixer_dist.perf.benchmark", *TINY, *args, f"--output={tmp_path}/r.json")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and flag in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "r.json").exists()


def test_input_compare_times_image_folder_and_tfrecord_pipelines_in_one_run(tmp_path):
    import io

    from convmixer_dist.commands import make_tfrecords
    from test_tfrecord import make_image_folder

    folder = make_image_folder(tmp_path / "folder", per_class=(6, 1))
    make_tfrecords.convert(folder, str(tmp_path / "records"), 3, 1, out=io.StringIO())
    out = tmp_path / "input.json"
    proc = run_cli("convmixer_dist.perf.benchmark", *TINY, "--measure=input", "--dataset=image_folder",
                   f"--data_dir={folder}", "--augment=rrc", "--crop_scale=0.08", "--crop_ratio=0.75,1.33",
                   "--randaug_n=2", "--randaug_m=27", "--randaug_mstd=1.5", "--erase_prob=0.25",
                   "--erase_mode=pixel", "--mixup_alpha=0.5", "--cutmix_alpha=0.5", "--decode_crop=false",
                   "--global_batch_size=6", "--window_steps=2", "--windows=2",
                   f"--input_compare=decode_crop=true,tfrecord={tmp_path / 'records'}", f"--output={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    base, compared = result["input_pipeline"], result["input_compare"]
    assert base["dataset"] == "image_folder" and base["decode_crop"] is False
    assert set(compared) == {"decode_crop=true", f"tfrecord={tmp_path / 'records'}"}
    assert compared[f"tfrecord={tmp_path / 'records'}"]["dataset"] == "tfrecord"
    for rate in compared.values():
        assert len(rate["window_images_per_sec"]) == 2
        assert rate["over_base"] == pytest.approx(rate["images_per_sec"] / base["images_per_sec"])
    assert "x base; per CPU-second" in proc.stdout and result["input_pipeline"]["images_per_cpu_second"] > 0


def test_augment_benchmark_times_both_placements(tmp_path):
    out = tmp_path / "augment.json"
    proc = run_cli("convmixer_dist.perf.augment_benchmark", "--batch_size=16", "--image_size=16", "--batches=2",
                   "--randaug_n=2", "--randaug_m=9", "--hflip", f"--output={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["placements"]) == {"tf_data", "on_device"}
    for rate in result["placements"].values():
        assert rate["images_per_sec"] > 0
        assert rate["images_per_sec_per_core"] == pytest.approx(rate["images_per_sec"] / result["cpu_cores"])
    assert result["spec"]["randaug_n"] == 2 and result["spec"]["hflip"] is True


@pytest.mark.parametrize("module", ["convmixer_dist.perf.benchmark", "convmixer_dist.perf.augment_benchmark"])
def test_an_unwritable_output_is_refused_before_any_timing(tmp_path, module):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    proc = run_cli(module, f"--output={blocker}/result.json")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith(f"error: --output={blocker}/result.json: ") and "cannot be created" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "window" not in proc.stdout
    assert blocker.read_text() == "not a directory"
    # An existing directory as --output: refused up front, nothing (no .tmp) left in it.
    existing = tmp_path / "existing"
    existing.mkdir()
    proc = run_cli(module, f"--output={existing}")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: --output={existing}: {existing} is a directory; expected a file name"]
    assert list(existing.iterdir()) == [] and "window" not in proc.stdout


def test_imagenet_like_jpegs_have_the_documented_shape(tmp_path):
    from convmixer_dist.perf import imagenet_like

    sizes = imagenet_like.generate(str(tmp_path), train_images=6, seed=1)
    files = sorted((tmp_path / "train").rglob("*.JPEG"))
    assert len(files) == 6 and len(sizes) == 6 + imagenet_like.VAL_IMAGES
    import tensorflow as tf

    for path in files:
        height, width, _ = tf.image.extract_jpeg_shape(tf.io.read_file(str(path))).numpy()
        assert 250 < min(height, width) and max(height, width) < 700
    assert 30_000 < sum(sizes) / len(sizes) < 150_000
