"""perf.scaling --predict: the data-parallel step-time model against hand-computed cases."""
import json

import pytest

from convmixer_dist.perf import scaling_model as scaling
from helpers import run_cli, tiny_config

LINK = scaling.Link(gpus_per_node=8, nvlink_bytes_per_sec=100e9, node_bytes_per_sec=10e9, latency_sec=1e-5)


def test_gradient_parameters_by_hand_and_as_built():
    # ConvMixer-1536/20, p7 k9, 1000 classes: stem 3*49*1536 + 1536 + 2*1536 = 230,400; a block
    # 81*1536 + 1536 + 3072 + 1536^2 + 1536 + 3072 = 2,492,928 (x 20); head 1536*1000 + 1000.
    assert scaling.gradient_parameters(1536, 20, 9, 7, 1000) == 230_400 + 20 * 2_492_928 + 1_537_000
    import keras

    from convmixer_dist.model import create_model

    config = tiny_config("/unused", hidden_dim=24, depth=3, kernel_size=5, patch_size=2, num_classes=7)
    model = create_model(config, "cpu")
    built = sum(int(keras.ops.size(w)) for w in model.trainable_weights)
    assert scaling.gradient_parameters(24, 3, 5, 2, 7) == built


def test_ring_inside_and_across_nodes():
    # 4 GPUs in one node: 2*3/4 of 100 MB over NVLink at 100 GB/s, no network latency.
    assert scaling.ring_seconds(4, 100e6, LINK) == pytest.approx(1.5e-3)
    # 16 GPUs over 2 nodes: 2*15/16 * 100 MB / 10 GB/s + 30 steps x 10 us.
    assert scaling.ring_seconds(16, 100e6, LINK) == pytest.approx(18.75e-3 + 0.3e-3)
    assert scaling.ring_seconds(1, 100e6, LINK) == 0


def test_two_level():
    # 32 GPUs = 4 nodes: 2*7/8 * 100 MB / 100 GB/s + 2*3/4 * 100 MB / 10 GB/s + 6 steps x 10 us.
    assert scaling.two_level_seconds(32, 100e6, LINK) == pytest.approx(1.75e-3 + 15e-3 + 0.06e-3)
    assert scaling.two_level_seconds(8, 100e6, LINK) == pytest.approx(1.75e-3)  # one node: NVLink only


def test_step_with_and_without_overlap():
    assert scaling.step_seconds(0.030, 0.050, overlap=False, tail=0.005) == pytest.approx(0.080)
    # Forward 10 ms, backward 20 ms hides 45 of the 50 ms; the last bucket's 5 ms follows it.
    assert scaling.step_seconds(0.030, 0.050, overlap=True, tail=0.005) == pytest.approx(0.060)
    # Communication shorter than the backward pass: only the last bucket shows.
    assert scaling.step_seconds(0.030, 0.010, overlap=True, tail=0.001) == pytest.approx(0.031)
    # One bucket for everything: nothing overlaps.
    assert scaling.step_seconds(0.030, 0.010, overlap=True, tail=0.010) == pytest.approx(0.040)


def test_buckets_pay_the_latency_each():
    # 100 MB in 25 MB buckets over 16 GPUs (2 nodes, ring): 4 all-reduces, each 30 x 10 us latency;
    # the last bucket, 2*15/16 * 25 MB / 10 GB/s + 0.3 ms, after the backward pass.
    # A 15 ms compute step: 5 ms forward, then 10 ms backward under which 19.95 - 4.99 ms cannot fit.
    row = scaling.predict(0.015, 25_000_000, 16, LINK, "ring", "float32", True, 25e6)
    assert row["buckets"] == 4 and row["comm_ms"] == pytest.approx(18.75 + 4 * 0.3)
    tail = 18.75 / 4 + 0.3
    assert row["step_ms"] == pytest.approx(5 + (18.75 + 1.2 - tail) + tail)
    one = scaling.predict(0.015, 25_000_000, 16, LINK, "ring", "float32", False, 25e6)
    assert one["buckets"] == 1 and one["step_ms"] == pytest.approx(15 + 18.75 + 0.3)


def test_predict_compression_halves_the_bytes():
    f32 = scaling.predict(0.05, 25_000_000, 16, LINK, "ring", "float32", False, 25e6)
    bf16 = scaling.predict(0.05, 25_000_000, 16, LINK, "ring", "bfloat16", False, 25e6)
    assert (f32["bytes"], bf16["bytes"]) == (100e6, 50e6)
    assert f32["comm_ms"] == pytest.approx(19.05)
    assert bf16["comm_ms"] == pytest.approx(9.375 + 0.3)
    assert f32["efficiency"] == pytest.approx(50 / 69.05)


def test_cli_table_from_flops(tmp_path):
    out = tmp_path / "p.json"
    result = run_cli("convmixer_dist.perf.scaling", "--predict", "--model=convmixer_1536_20", "--gpus=8,16",
                     "--inter_node_gbps=100,400", f"--output={out}")
    assert result.returncode == 0, result.stderr
    # The arithmetic: 3 x 102.2 GFLOP x 64 images at 40% of 990 TFLOP/s is ~50 ms.
    assert "51.6M gradient parameters" in result.stdout and "step 49.6 ms" in result.stdout
    saved = json.loads(out.read_text())
    assert [t["inter_node_gbps"] for t in saved["tables"]] == [100, 400]
    assert len(saved["tables"][0]["rows"]) == 2 * 2 * 2 * 2  # GPUs x algorithms x dtypes x overlap
    ring16 = next(r for r in saved["tables"][0]["rows"] if (r["gpus"], r["algorithm"], r["allreduce_dtype"],
                                                            r["overlap"]) == (16, "ring", "float32", False))
    expected = 2 * 15 / 16 * 4 * 51_625_960 / 12.5e9 + 30 * 5e-6
    assert ring16["comm_ms"] == pytest.approx(1e3 * expected)
    # The 768/32 preset and the columns asked for: two-level only, bf16 only (with and without overlap).
    result = run_cli("convmixer_dist.perf.scaling", "--predict", "--model=convmixer_768_32", "--gpus=16",
                     "--algorithms=two_level", "--reduction_dtypes=bfloat16")
    assert result.returncode == 0, result.stderr
    assert "21.1M gradient parameters" in result.stdout
    assert "GPUs | two_level bf16 | two_level bf16 overlap" in result.stdout


def test_measured_row_by_hand():
    # 2 workers: 90 img/s together, 50 img/s alone at the same batch, 95 as two independent
    # processes, 60 img/s alone at the global batch; steps 711.1 ms vs 640 ms alone.
    single = {"images_per_sec": 50.0, "step_time_ms": 640.0}
    independent = {"images_per_sec": 95.0, "step_time_ms": 673.7}
    strong = {"images_per_sec": 60.0, "step_time_ms": 1066.7}
    multi = {"images_per_sec": 90.0, "step_time_ms": 711.1}
    wire = {"tx_bytes_per_step": 2.1e6, "rx_bytes_per_step": 2.1e6}
    graph = {"collectives": 5, "gradient_collectives": 2, "bytes": 2.0e6, "gradient_bytes": 1.998e6}
    row = scaling.measured_row(2, single, independent, strong, multi, wire, graph, gradient_bytes=1_000_000)
    assert row["weak_efficiency"] == pytest.approx(0.9) and row["weak_efficiency_vs_independent"] == pytest.approx(90 / 95)
    assert row["strong_speedup"] == pytest.approx(1.5) and row["strong_efficiency"] == pytest.approx(0.75)
    assert (row["compute_ms"], row["comm_ms"]) == (640.0, pytest.approx(71.1))
    assert row["comm_ms_vs_independent"] == pytest.approx(37.4)
    # A ring of 2 sends 2(2-1)/2 = 1 x the reduced bytes per worker; of 4 workers, 1.5 x.
    assert row["allreduced_bytes_per_step_measured"] == 2.1e6 and row["full_gradients_per_step_measured"] == 2.1
    assert row["measured_over_graph"] == pytest.approx(1.05) and row["collectives_per_step"] == 5
    assert row["gradient_collectives_per_step"] == 2 and row["full_gradients_per_step_graph"] == pytest.approx(1.998)
    four = scaling.measured_row(4, single, independent, strong, multi, wire, None, 1_000_000)
    assert four["allreduced_bytes_per_step_measured"] == pytest.approx(1.4e6) and "collectives_per_step" not in four
    assert "wire_tx_bytes_per_step" not in scaling.measured_row(2, single, independent, strong, multi, None, None, 1)
    table = scaling.format_measured_table([{"variant": "base", "rate": "100mbit", **row}])
    assert table.splitlines()[2] == ("base | 100mbit | 90.0 | 0.90 | 0.95 | 0.75 | 711 = 640 + 71 | 2.10 (2.10) | "
                                     "2.00 | 5 (2 gradient)")


@pytest.mark.parametrize("args,named", [(["--predict", "--mfu=2"], "--mfu"), (["--predict", "--gpus=0"], "--gpus=0"),
                                        (["--predict", "--model=nope"], "--model"),
                                        (["--predict", "--algorithms=tree"], "--algorithms=tree"),
                                        (["--predict", "--reduction_dtypes=int8"], "--reduction_dtypes=int8")])
def test_cli_bad_arguments_are_one_line(args, named):
    result = run_cli("convmixer_dist.perf.scaling", *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and named in lines[0]
