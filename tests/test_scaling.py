"""perf.scaling measured mode on the test bed (launch/testing/netns_cluster.sh, needs root as CI runs):
the tiniest run, every field of its JSON, the bytes on the wire against the gradient; the
variant parser; one-line errors."""
import json
import math
import subprocess

import pytest

from convmixer_dist import config as cfg
from convmixer_dist.errors import UsageError
from convmixer_dist.perf import scaling, scaling_model
from helpers import run_cli

# 2 workers x 4 images of a 128-channel, 2-block ConvMixer on 8x8 inputs: a 156 kB float32 gradient,
# large enough that TCP/IP and gRPC framing stay a few percent of the bytes sent per step.
TINY = ["--hidden_dim=128", "--depth=2", "--kernel_size=3", "--patch_size=2", "--image_size=8",
        "--num_classes=4", "--synthetic_train_size=256", "--steps_per_loop=2", "--window_steps=4",
        "--windows=2", "--per_device_batch=4", "--clip_norm=1"]
RATE_BITS = 40e6  # --rate=40mbit


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_measured_weak_and_strong_scaling_on_the_test_bed(tmp_path):
    out = tmp_path / "scaling.json"
    result = run_cli("convmixer_dist.perf.scaling", *TINY, "--rate=40mbit", f"--output={out}",
                     timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    saved = json.loads(out.read_text())
    setup = saved["setup"]
    assert setup["workers"] == 2 and setup["per_device_batch"] == 4 and len(set(setup["cores"])) == 2
    assert setup["testbed"]["created"] and setup["testbed"]["hosts"] == ["198.18.0.1", "198.18.0.2"]
    gradient_bytes = 4 * scaling_model.gradient_parameters(128, 2, 3, 2, 4)
    assert setup["gradient_parameters"] * 4 == gradient_bytes == 156_176
    # The bed it brought up is gone.
    assert setup["testbed"]["prefix"] not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                           text=True).stdout

    base = saved["variants"]["base"]
    assert base["settings"] == {} and base["setup"]["strategy"] == "one_device"
    single, independent, strong = base["single"], base["independent"], base["strong_reference"]
    assert len(independent["per_process"]) == 2
    assert independent["images_per_sec"] == pytest.approx(sum(p["images_per_sec"] for p in independent["per_process"]))
    for run in [single, strong, *independent["per_process"]]:
        assert run["images_per_sec"] > 0 and len(run["window_images_per_sec"]) == 2
    assert set(base["multi"]) == {"40mbit"}
    for rate, row in base["multi"].items():
        for key in ("images_per_sec", "step_time_ms", "weak_efficiency", "weak_efficiency_vs_independent",
                    "strong_efficiency", "strong_speedup", "compute_ms", "comm_ms", "comm_ms_vs_independent",
                    "wire_tx_bytes_per_step", "wire_rx_bytes_per_step", "allreduced_bytes_per_step_measured",
                    "full_gradients_per_step_measured"):
            assert _finite(row[key]), (rate, key, row.get(key))
        assert len(row["workers_images_per_sec"]) == 2
        assert row["weak_efficiency"] == pytest.approx(row["images_per_sec"] / (2 * single["images_per_sec"]))
        assert row["weak_efficiency_vs_independent"] == pytest.approx(row["images_per_sec"]
                                                                      / independent["images_per_sec"])
        assert row["strong_efficiency"] == pytest.approx(row["images_per_sec"] / (2 * strong["images_per_sec"]))
        assert row["compute_ms"] == single["step_time_ms"]
        assert row["comm_ms"] == pytest.approx(row["step_time_ms"] - single["step_time_ms"])
        assert 0 < row["weak_efficiency"] < 1.5 and row["step_time_ms"] == pytest.approx(
            1000 * 8 / row["images_per_sec"])
        # Both workers send what they receive (a ring of two): at least the gradient once per step.
        wire = row["wire"]
        assert wire["steps_counted"] == 4 and len(wire["tx_bytes_per_step_by_worker"]) == 2
        assert row["wire_rx_bytes_per_step"] == pytest.approx(row["wire_tx_bytes_per_step"], rel=0.02)
        assert 0.98 <= row["full_gradients_per_step_measured"] <= 2.2
        # The traced graph: one float32 gradient all-reduce per optimizer step (25 MB buckets: one
        # bucket here) plus one small bookkeeping collective; the bytes sent per worker are
        # 2(N-1)/N = 1 x what the graph all-reduces, within 10% (TCP/IP and gRPC framing).
        graph = row["graph"]
        assert graph["gradient_bytes"] == gradient_bytes and graph["dtypes"] == ["float32"]
        assert row["gradient_collectives_per_step"] == 1 and row["collectives_per_step"] == 2
        assert row["full_gradients_per_step_graph"] == 1
        assert abs(row["measured_over_graph"] - 1) < 0.10, row["measured_over_graph"]
    # The shaped link carries a step's bytes at 40 Mbit/s at best, so the step takes at least that
    # long (unshaped, these 0.3 MB take a few ms).
    shaped = base["multi"]["40mbit"]
    assert shaped["step_time_ms"] >= 0.9 * 1000 * shaped["wire_tx_bytes_per_step"] * 8 / RATE_BITS
    table = [line for line in result.stdout.splitlines() if line.startswith("base | ")]
    assert [line.split(" | ")[1] for line in table] == ["40mbit"] and saved["table"].endswith(table[0])
    assert f"Saved {out}" in result.stdout


def _values(**changes) -> dict:
    values = {field.name: getattr(cfg.Config(), field.name) for field in cfg.settings()}
    return {**values, **changes}


def test_variants_change_any_training_setting_once_each():
    variants = scaling.parse_variants(["clip_norm=0", "precision=mixed_bfloat16", "model=convmixer_768_32"],
                                      _values(clip_norm=1.0, hidden_dim=None, depth=None))
    assert [label for label, _ in variants] == ["base", "clip_norm=0", "precision=mixed_bfloat16",
                                                 "model=convmixer_768_32"]
    base, no_clip, bf16, other_model = (config for _, config in variants)
    assert (base.clip_norm, no_clip.clip_norm, bf16.clip_norm) == (1.0, 0.0, 1.0)
    assert bf16.precision == "mixed_bfloat16" and base.precision == "auto"
    assert (other_model.hidden_dim, other_model.depth) == (768, 32)  # sizes from the new preset
    for item, named in [("strategy=mirrored", "strategy=mirrored"), ("nope=1", "nope=1"),
                        ("clip_norm", "clip_norm"), ("clip_norm=-1", "expected"),
                        ("precision=fp8", "precision=fp8"), ("steps_per_loop=x", "not a valid int")]:
        with pytest.raises(UsageError, match=named):
            scaling.parse_variants([item], _values())


@pytest.mark.parametrize("args,named", [
    (["--workers=1"], "--workers"), (["--variants=strategy=mirrored"], "strategy=mirrored"),
    (["--global_batch_size=64"], "--global_batch_size"), (["--rate=fast"], "--rate=fast"),
    (["--cores=0,0,7"], "--cores"), (["--window_steps=5", "--steps_per_loop=2"], "--window_steps=5"),
    (["--windows=1"], "--windows"), (["--testbed=zz0"], "--testbed=zz0"),
    (["--testbed=cmdtb", "--rate=1gbit"], "--rate with --testbed")])
def test_bad_measured_arguments_are_one_line_before_anything_starts(args, named):
    result = run_cli("convmixer_dist.perf.scaling", *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and named in lines[0], result.stderr
