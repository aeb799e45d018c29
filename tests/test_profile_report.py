"""profile_report reads a real captured profile through xprof: kinds partition the op time, the
ConvMixer convolutions are found, each kind's achieved rate is its work (from the model's shapes) over
its time, the files are written, and the CLI fails in one line on no profile."""
import contextlib
import io
import json
import os
import re

import numpy as np
import pytest

from convmixer_dist import strategy as strategy_lib
from convmixer_dist.training.loop import train_and_evaluate
from convmixer_dist.model import build_convmixer
from convmixer_dist.perf import flops, kind_rates, profile_report
from convmixer_dist.errors import UsageError
from convmixer_dist.perf.profile_report import OpRow, UNLISTED, classify
from helpers import run_cli, tiny_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A training run whose steps 3..5 were profiled (captured once for the whole file)."""
    directory = str(tmp_path_factory.mktemp("profiled"))
    config = tiny_config(directory, train_steps=9, steps_per_loop=3, profile_steps="3,6")
    with contextlib.redirect_stdout(io.StringIO()):
        train_and_evaluate(config, strategy_lib.create_strategy(config))
    return directory


def test_classify_by_layer_path_scope_and_type():
    loop = "while/body/_1/while/convmixer_1"
    grad = "while/body/_1/gradient_tape/while/replica_1/convmixer_1"
    cases = {
        (f"{grad}/block01_depthwise_conv_1/depthwise/DepthwiseConv2dNativeBackpropFilter",
         "_MklNativeDepthwiseConv2dNativeBackpropFilter"): "depthwise_conv",
        (f"{loop}/block00_pointwise_conv_1/BiasAdd", "_MklNativeFusedConv2D"): "pointwise_conv",
        (f"{loop}/stem_conv_1/BiasAdd", "_MklNativeFusedConv2D"): "stem_conv",
        (f"{grad}/block12_pointwise_bn_1/moments/mul_1", "Mul"): "batch_norm",
        (f"{loop}/stem_act_1/Gelu/Erfc", "Erfc"): "activation",
        (f"{grad}/head_pool_1/Tile", "Tile"): "head",
        (f"{loop}/head_dense_1/BiasAdd", "_MklNativeFusedMatMul"): "head",
        (f"{loop}/block01_residual_1/ArithmeticOptimizer/AddOpsRewrite_Leaf_1_Add", "AddN"): "other",
        ("while/body/_1/while/AddN_15", "AddN"): "other",  # a gradient sum: no layer in its name
        ("while/body/_1/while/adam_w/AssignSubVariableOp_12", "AssignSubVariableOp"): "optimizer",
        ("while/body/_1/while/adam_w/AddN_20", "AddN"): "all_reduce",
        (f"{grad}/stem_conv_1/BiasAdd/BiasAddGrad/_109", "_Send"): "all_reduce",
        ("while/body/_1/while/CollectiveReduceV2_3", "CollectiveReduceV2"): "all_reduce",
        ("NcclAllReduce", "NcclAllReduce"): "all_reduce",
        ("while/body/_1/while/IteratorGetNext", "IteratorGetNext"): "input",
        ("Iterator::Root::Prefetch::ParallelMapV2", "Dataset"): "input",
        ("resize/ResizeBilinear", "ResizeBilinear"): "input",  # a tf.data map function's op
        ("while/body/_1/fused/DepthwiseConv2dNative", "DepthwiseConv2dNative"): "depthwise_conv",
        ("while/body/_1/while/softmax_cross_entropy_with_logits", "SoftmaxCrossEntropyWithLogits"): "other",
        (UNLISTED, UNLISTED): "other",
        # Data movement: the folded depthwise gradient's transposes, mixed precision's casts.
        ("while/body/_1/while/block00_depthwise_conv/transpose", "_MklTranspose"): "layout",
        (f"{loop}/block00_depthwise_bn_1/Cast", "Cast"): "layout",
        ("while/body/_1/while/block00_depthwise_conv/Pad", "Pad"): "layout",
        ("map/Cast", "Cast"): "input",  # a tf.data function's cast, outside the train loop
    }
    assert {key: classify(*key) for key in cases} == cases


def test_xla_calls_are_async_ops_with_an_xla_run_inside():
    def event(event_name, ts, dur, tid=1, **args):
        return {"ph": "X", "name": event_name, "ts": ts, "dur": dur, "pid": 7, "tid": tid, "args": args}

    start = "ExecutorState::ProcessAsync::Start"
    trace = {"traceEvents": [
        event(start, 100, 50, name="w/block00_pointwise_act_1/PartitionedCall", kernel_type="PartitionedCall"),
        event("CpuExecutable::ExecuteAsyncOnStream", 110, 30),
        event(start, 300, 70, name="w/block00_pointwise_act_1/PartitionedCall", kernel_type="PartitionedCall"),
        event("CpuExecutable::ExecuteAsyncOnStream", 310, 40),
        event(start, 500, 90, name="w/IteratorGetNext", kernel_type="IteratorGetNext"),  # no XLA run
        event(start, 700, 20, tid=2, name="w/other_thread", kernel_type="PartitionedCall"),
        event("CpuExecutable::ExecuteAsyncOnStream", 705, 10, tid=3),  # another thread's run
        {"ph": "i", "name": start, "ts": 0, "pid": 7, "tid": 1},
    ]}
    assert profile_report.xla_call_rows(trace) == [
        OpRow("w/block00_pointwise_act_1/PartitionedCall", profile_report.XLA_CALL, "host", 2, pytest.approx(0.12))]
    assert classify("w/StatefulPartitionedCall", profile_report.XLA_CALL) == "other"  # --xla=on's step
    assert profile_report.xla_call_rows({}) == []


def test_summarise_uses_device_ops_when_present_and_partitions_their_time():
    rows = [OpRow("a/block00_depthwise_conv_1/x", "DepthwiseConv2dNative", "device", 4, 6.0),
            OpRow("a/block00_pointwise_conv_1/x", "Conv2D", "device", 4, 3.0),
            OpRow(UNLISTED, UNLISTED, "device", 0, 1.0),
            OpRow("a/block00_pointwise_conv_1/x", "Conv2D", "host", 4, 50.0)]
    report = profile_report.summarise(rows, top=5, step_times_ms=[2.0, 4.0])
    assert report["device"] == "device" and report["total_self_time_ms"] == pytest.approx(10.0)
    assert report["shares"]["depthwise_conv"] == pytest.approx(60.0)
    assert report["shares"]["other"] == pytest.approx(10.0)
    assert [op["self_ms"] for op in report["top_ops"]] == [6.0, 3.0]  # the unlisted rest is no op
    assert report["steps"] == 2 and report["step_time_ms"] == pytest.approx(3.0)
    assert report["blocks"]["block00"]["ms"] == pytest.approx(9.0)
    assert profile_report.summarise(rows, top=5, side="host")["total_self_time_ms"] == pytest.approx(50.0)
    with pytest.raises(UsageError, match="--side=device"):
        profile_report.summarise([rows[-1]], top=5, side="device")
    assert report["warnings"] == []
    only_input = [OpRow("Iterator::Root::Prefetch", "Dataset", "host", 4, 5.0)]  # --xla=on on CPU
    assert "XLA" in profile_report.summarise(only_input, top=5)["warnings"][0]


def test_work_per_kind_from_the_model_shapes_and_rates_against_the_peaks():
    # tiny_config: h=16, depth 2, k=3, p=2, 8 px (n=4), 4 classes, batch 32: a feature map is
    # 32*4*4*16 = 8192 elements; 5 activation and 5 BatchNorm layers.
    work = flops.step_work(16, 2, 3, 2, 8, 4, batch=32)
    assert work == {"pointwise_conv": {"flops": 3 * 2 * 2 * 8192 * 16},
                    "depthwise_conv": {"flops": 3 * 2 * 2 * 8192 * 9},
                    "stem_conv": {"flops": 2 * 2 * 8192 * 2 * 2 * 3},  # no input gradient
                    "head": {"flops": 3 * 2 * 32 * 16 * 4},
                    "activation": {"bytes": 5 * 5 * 8192 * 4}, "batch_norm": {"bytes": 5 * 5 * 8192 * 4},
                    "optimizer": {"bytes": 7 * 4 * 1300}}
    assert flops.step_work(16, 2, 3, 2, 8, 4, batch=32, element_bytes=2)["batch_norm"] == {"bytes": 5 * 5 * 8192 * 2}
    model = build_convmixer(hidden_dim=16, depth=2, kernel_size=3, patch_size=2, num_classes=4, image_size=8)
    assert sum(int(np.prod(v.shape)) for v in model.trainable_variables) == flops.trainable_params(16, 2, 3, 2, 4) == 1300
    # 10 steps: pointwise 15.73 MFLOP in 0.2 ms = 0.0786 TFLOP/s; BatchNorm 8.192 MB in 4 ms = 2.048 GB/s.
    rates = kind_rates.kind_rates({"pointwise_conv": 0.2, "batch_norm": 4.0, "head": 0.0}, 10, work,
                                  peak_tflops=0.1, peak_gbps=4.096)
    assert rates == {"pointwise_conv": {"tflops": pytest.approx(0.0786432), "of_peak": pytest.approx(0.786432)},
                     "batch_norm": {"gbps": pytest.approx(2.048), "of_peak": pytest.approx(0.5)}}
    assert kind_rates.kind_rates({"batch_norm": 40.0}, None, work, 0.1, 4.0) == {}  # steps unknown
    assert profile_report._rate_cells(rates["batch_norm"]) == "| 2.05 GB/s | 50% |"


def test_report_of_a_captured_training_window(model_dir):
    paths = profile_report.find_profile(model_dir)
    report = profile_report.build_report(paths, top=60, peak_tflops=0.5, peak_gbps=10.0)
    assert report["device"] == "host"  # CPU only
    assert report["steps"] == 3 and report["step_time_ms"] > 0  # the window 3,6: one marker per step
    for kind in ("depthwise_conv", "pointwise_conv"):
        ops = [op for op in report["top_ops"] if op["kind"] == kind]
        assert ops and all(kind in op["name"] and op["self_ms"] > 0 for op in ops)
        assert report["shares"][kind] > 0
    # The default kernels on CPU: fused BatchNorm ops, and the XLA GELU calls (absent from the op
    # table) read from the trace, forward and gradient of every activation layer.
    assert any(op["type"].endswith("FusedBatchNormV3") and op["kind"] == "batch_norm"
               for op in report["top_ops"])
    assert report["shares"]["batch_norm"] > 0 and report["shares"]["activation"] > 0
    calls = profile_report.xla_call_rows(profile_report.load_trace(paths))
    layers = ("stem_act", "block00_depthwise_act", "block00_pointwise_act", "block01_depthwise_act",
              "block01_pointwise_act")
    for layer in layers:
        mine = [row for row in calls if f"/{layer}" in row.name]
        assert len(mine) == 2 and all(row.occurrences == 3 and row.self_ms > 0 for row in mine), calls
        assert sum("/gradient/" in row.name for row in mine) == 1
    assert {classify(row.name, row.type) for row in calls} == {"activation"}
    assert any("gradient_tape/" in op["name"] for op in report["top_ops"])  # backward ops counted
    assert sum(report["shares"].values()) == pytest.approx(100, abs=0.5)
    assert sum(report["kinds_ms"].values()) == pytest.approx(report["total_self_time_ms"], rel=1e-6)
    assert set(report["blocks"]) == {"block00", "block01"} and report["warnings"] == []
    # The run's flags.txt gives each kind its work, so its rate against the given peaks.
    assert report["precision"] == "float32" and report["peak_tflops_source"] == "--peak_tflops"
    assert report["work_per_step"] == flops.step_work(16, 2, 3, 2, 8, 4, batch=32)
    for kind, unit, peak in (("pointwise_conv", "tflops", 0.5), ("depthwise_conv", "tflops", 0.5),
                             ("batch_norm", "gbps", 10.0), ("activation", "gbps", 10.0)):
        rate = report["rates"][kind]
        expected = next(iter(report["work_per_step"][kind].values())) * 3 / report["kinds_ms"][kind] * 1e3
        assert rate[unit] == pytest.approx(expected / (1e12 if unit == "tflops" else 1e9))
        assert rate["of_peak"] == pytest.approx(rate[unit] / peak)
    assert "layout" not in report["rates"] and "other" not in report["rates"]

    json_path, md_path = profile_report.write_report(report)
    assert os.path.dirname(json_path) == os.path.dirname(paths[0])
    with open(json_path) as f:
        saved = json.load(f)
    assert saved["shares"] == pytest.approx(report["shares"]) and saved["profile"] == report["profile"]
    with open(md_path) as f:
        assert "| depthwise_conv |" in f.read()


def test_cli_prints_the_report_and_fails_in_one_line_without_a_profile(model_dir, tmp_path):
    done = run_cli("convmixer_dist.perf.profile_report", model_dir, "--top=5")
    assert done.returncode == 0, done.stderr
    assert "| kind | ms | % | achieved | of peak |" in done.stdout and "## Top 5 ops by self time" in done.stdout
    # The peaks measured by the command itself: positive rates, each kind's fraction of them.
    assert "TFLOP/s (measured (float32 matmul))" in done.stdout and "(measured (float32 x * a + b))" in done.stdout
    assert re.search(r"\| pointwise_conv \| [\d.]+ \| [\d.]+ \| [\d.e+-]+ TFLOP/s \| \d+% \|", done.stdout), done.stdout
    assert "3 steps" in done.stdout and "host-side ops" in done.stdout
    assert "Traceback" not in done.stderr

    empty = run_cli("convmixer_dist.perf.profile_report", str(tmp_path))
    assert empty.returncode == 2 and empty.stderr.count("\n") == 1, empty.stderr
    assert empty.stderr.startswith(f"error: MODEL_DIR {tmp_path}: no profile found")
    assert "capture one with --profile_steps=START,END" in empty.stderr
    wrong_run = run_cli("convmixer_dist.perf.profile_report", model_dir, "--run=nope")
    assert wrong_run.returncode == 2 and wrong_run.stderr.count("\n") == 1, wrong_run.stderr
    assert wrong_run.stderr.startswith("error: --run=nope: not a profile run of")
