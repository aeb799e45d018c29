"""Scaling: a model of data-parallel step time on N GPUs (`--predict`), from one device's step time.

    python -m convmixer_dist.perf.scaling --predict --model=convmixer_1536_20 --per_device_batch=64 \
        --peak_tflops=990 --mfu=0.4 --inter_node_gbps=100,200,400
    python -m convmixer_dist.perf.scaling --predict --model=convmixer_768_32 --step_time_ms=120

Arithmetic, not a measurement. Weak scaling (a fixed batch per GPU): every GPU computes its step in
the single-device time `t_c` (given with --step_time_ms, or 3 x forward FLOPs x batch / (peak x MFU)),
then the gradient (the model's trainable parameters x the reduction dtype's size) is all-reduced:
- ring: one ring over all N GPUs. A ring all-reduce sends and receives 2(N-1)/N of the gradient per
  GPU; across nodes every node's network link carries that much, so
  t = 2(N-1)/N x S / B_node + 2(N-1) x latency (B_nvlink instead inside one node).
- two_level: reduce-scatter over NVLink inside each node, a ring all-reduce of each GPU's 1/g shard
  across the M = N/g nodes (the g shards share the node's network link), all-gather over NVLink:
  t = 2(g-1)/g x S / B_nvlink + 2(M-1)/M x S / B_node + 2(M-1) x latency.
- no overlap: step = t_c + t_comm. With overlap (buckets all-reduced as the backward pass produces
  them, last layer first): the backward pass is 2/3 of t_c (training = 3 x forward FLOPs); all but
  the last bucket can hide under it, the last one (the first layer's gradients, produced last) cannot:
  step = t_c/3 + max(2t_c/3, t_comm - t_tail) + t_tail, t_tail = t_comm x min(1, bucket / S).
- compression: the gradient reduced in bfloat16/float16 halves S (the casts are not counted).
Efficiency = t_c / step. Not modelled: the network's own congestion, NCCL's protocol overheads and
chunking, stragglers, the input pipeline; NVLink latency is taken as zero.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys

from absl import flags

from convmixer_dist import presets
from convmixer_dist.errors import UsageError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DEFAULT_GPUS = (8, 16, 32, 64, 128, 256, 512)
TRAINING_MULTIPLIER = 3  # training FLOPs = forward + 2 x forward for the backward pass


@dataclasses.dataclass(frozen=True)
class Link:
    """The interconnect: per-direction bandwidths in bytes/s, per-step network latency in s."""
    gpus_per_node: int = 8
    nvlink_bytes_per_sec: float = 450e9  # H100/H200 SXM NVLink 4: 900 GB/s in total, 450 GB/s each way
    node_bytes_per_sec: float = 12.5e9   # 100 Gb/s per node
    latency_sec: float = 5e-6


def gradient_parameters(hidden_dim: int, depth: int, kernel_size: int, patch_size: int, num_classes: int,
                        channels: int = 3) -> int:
    """Trainable parameters of the ConvMixer (model.py): patch conv + BN, per block depthwise conv +
    BN + pointwise conv + BN (each conv with a bias, each BN a scale and an offset), the dense head."""
    d = hidden_dim
    stem = channels * patch_size * patch_size * d + d + 2 * d
    block = kernel_size * kernel_size * d + d + 2 * d + d * d + d + 2 * d
    return stem + depth * block + d * num_classes + num_classes


def ring_seconds(gpus: int, nbytes: float, link: Link) -> float:
    """One ring all-reduce of `nbytes` over `gpus` GPUs (inside one node: NVLink)."""
    if gpus <= 1:
        return 0.0
    if gpus <= link.gpus_per_node:
        return 2 * (gpus - 1) / gpus * nbytes / link.nvlink_bytes_per_sec
    return 2 * (gpus - 1) / gpus * nbytes / link.node_bytes_per_sec + 2 * (gpus - 1) * link.latency_sec


def two_level_seconds(gpus: int, nbytes: float, link: Link) -> float:
    """Reduce-scatter on NVLink, ring all-reduce across nodes, all-gather on NVLink."""
    g = min(gpus, link.gpus_per_node)
    nodes = math.ceil(gpus / link.gpus_per_node)
    inside = 2 * (g - 1) / g * nbytes / link.nvlink_bytes_per_sec
    if nodes <= 1:
        return inside
    return (inside + 2 * (nodes - 1) / nodes * nbytes / link.node_bytes_per_sec
            + 2 * (nodes - 1) * link.latency_sec)


ALGORITHMS = {"ring": ring_seconds, "two_level": two_level_seconds}


def step_seconds(compute: float, comm: float, overlap: bool, tail_fraction: float) -> float:
    """The step time from compute and communication (see the module docstring)."""
    if not overlap:
        return compute + comm
    tail = comm * min(1.0, tail_fraction)
    return compute / 3 + max(2 * compute / 3, comm - tail) + tail


def predict(compute: float, gradient_params: int, gpus: int, link: Link, algorithm: str, dtype: str,
            overlap: bool, bucket_bytes: float) -> dict:
    """Predicted step of one setting: communication seconds, step seconds, efficiency."""
    nbytes = gradient_params * DTYPE_BYTES[dtype]
    comm = ALGORITHMS[algorithm](gpus, nbytes, link)
    step = step_seconds(compute, comm, overlap, bucket_bytes / nbytes)
    return {"gpus": gpus, "algorithm": algorithm, "allreduce_dtype": dtype, "overlap": overlap,
            "bytes": nbytes, "compute_ms": 1e3 * compute, "comm_ms": 1e3 * comm, "step_ms": 1e3 * step,
            "efficiency": compute / step}


def predict_table(compute: float, gradient_params: int, gpus_list, link: Link, bucket_bytes: float,
                  dtypes=("float32", "bfloat16")) -> list[dict]:
    """Every combination of GPUs, algorithm, overlap and reduction dtype."""
    return [predict(compute, gradient_params, n, link, algorithm, dtype, overlap, bucket_bytes)
            for n in gpus_list for algorithm in ALGORITHMS for dtype in dtypes for overlap in (False, True)]


def format_table(rows: list[dict]) -> str:
    """Efficiency per GPU count (rows) and setting (columns), plus the step time in ms."""
    settings = sorted({(r["algorithm"], r["allreduce_dtype"], r["overlap"]) for r in rows},
                      key=lambda s: (list(ALGORITHMS).index(s[0]), s[2], s[1] != "float32"))
    short = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
    names = [f"{a} {short[d]}{' overlap' if o else ''}" for a, d, o in settings]
    lines = ["GPUs | " + " | ".join(names), "---: | " + " | ".join("---:" for _ in names)]
    for n in sorted({r["gpus"] for r in rows}):
        cells = []
        for setting in settings:
            r = next(r for r in rows if (r["gpus"], r["algorithm"], r["allreduce_dtype"], r["overlap"])
                     == (n, *setting))
            cells.append(f"{r['efficiency']:.2f} ({r['step_ms']:.0f} ms)")
        lines.append(f"{n} | " + " | ".join(cells))
    return "\n".join(lines)


# The tool's arguments and their bounds, declared once: (name, default, low, high, help).
FLOAT_ARGS = [
    ("step_time_ms", 0.0, 0.0, 1e7, "Single-device step time at --per_device_batch; 0 = from FLOPs "
     "(3 x forward x batch / (--peak_tflops x --mfu))."),
    ("peak_tflops", 990.0, 0.001, 1e5, "Device peak TFLOP/s for the FLOPs-based step time (H100/H200 "
     "SXM dense bfloat16: 990)."),
    ("mfu", 0.4, 0.001, 1.0, "Fraction of the peak the step achieves (FLOPs-based step time)."),
    ("nvlink_gbytes", 450.0, 0.001, 1e5, "Inside a node: GB/s per GPU and direction (NVLink 4: 450)."),
    ("latency_us", 5.0, 0.0, 1e6, "Network latency per ring step, microseconds."),
    ("bucket_mb", 25.0, 0.001, 1e6, "Gradient bucket (MB) for the overlap model: the last one cannot "
     "overlap."),
]
INT_ARGS = [
    ("per_device_batch", 64, 1, 65536, "Images per GPU and step (weak scaling: fixed)."),
    ("gpus_per_node", 8, 1, 1024, "GPUs per node (NVLink domain)."),
    ("nics_per_node", 1, 1, 64, "Network links per node, each of --inter_node_gbps."),
]


def define_flags() -> None:
    flags.DEFINE_boolean("predict", False, "Predict step time and efficiency for N GPUs (arithmetic).")
    for name, default, low, high, text in FLOAT_ARGS:
        flags.DEFINE_float(name, default, text, lower_bound=low, upper_bound=high)
    for name, default, low, high, text in INT_ARGS:
        flags.DEFINE_integer(name, default, text, lower_bound=low, upper_bound=high)
    flags.DEFINE_list("gpus", [str(n) for n in DEFAULT_GPUS], "GPU counts to predict (1..1048576).")
    flags.DEFINE_list("inter_node_gbps", ["100"], "Network rate per link between nodes, Gb/s (one "
                      "table each), 0.001..1e6.")
    flags.DEFINE_string("model", "convmixer_1536_20", "Preset whose gradient is reduced: "
                        + ", ".join(presets.PRESETS) + ".")
    flags.DEFINE_string("output", "", "Also write the JSON result here.")


def _numbers(flag: str, items: list[str], kind, low: float, high: float) -> list:
    try:
        values = [kind(item) for item in items]
    except ValueError:
        raise UsageError(f"--{flag}={','.join(items)}: expected a list of numbers") from None
    if not values or any(not low <= v <= high for v in values):
        raise UsageError(f"--{flag}={','.join(items)}: expected numbers in [{low:g}, {high:g}]")
    return values


def run_predict(opts) -> dict:
    if opts.model not in presets.PRESETS:
        raise UsageError(f"--model={opts.model}: expected one of {', '.join(presets.PRESETS)}")
    gpus_list = _numbers("gpus", opts.gpus, int, 1, 1 << 20)
    rates = _numbers("inter_node_gbps", opts.inter_node_gbps, float, 0.001, 1e6)
    p = presets.PRESETS[opts.model]
    params = gradient_parameters(p["hidden_dim"], p["depth"], p["kernel_size"], p["patch_size"],
                                 p["num_classes"])
    if opts.step_time_ms:
        compute, source = opts.step_time_ms / 1e3, "--step_time_ms"
    else:
        from convmixer_dist.perf.flops import convmixer_flops

        forward = convmixer_flops(p["hidden_dim"], p["depth"], p["kernel_size"], p["patch_size"],
                                  p["image_size"], p["num_classes"])
        compute = TRAINING_MULTIPLIER * forward * opts.per_device_batch / (opts.peak_tflops * 1e12 * opts.mfu)
        source = (f"{TRAINING_MULTIPLIER} x {forward / 1e9:.1f} GFLOP x {opts.per_device_batch} images / "
                  f"({opts.peak_tflops:g} TFLOP/s x MFU {opts.mfu:g})")
    result = {"model": opts.model, "gradient_parameters": params, "compute_ms": 1e3 * compute,
              "compute_source": source, "per_device_batch": opts.per_device_batch, "tables": []}
    print(f"{opts.model}: {params / 1e6:.1f}M gradient parameters ({params * 4 / 1e6:.0f} MB float32); "
          f"single-device step {1e3 * compute:.1f} ms ({source}); arithmetic, not measured")
    for rate in rates:
        link = Link(opts.gpus_per_node, opts.nvlink_gbytes * 1e9, rate * 1e9 / 8 * opts.nics_per_node,
                    opts.latency_us * 1e-6)
        rows = predict_table(compute, params, gpus_list, link, opts.bucket_mb * 1e6)
        result["tables"].append({"link": dataclasses.asdict(link), "inter_node_gbps": rate, "rows": rows})
        print(f"\n{opts.gpus_per_node} GPUs/node, NVLink {opts.nvlink_gbytes:g} GB/s, {opts.nics_per_node} x "
              f"{rate:g} Gb/s between nodes, latency {opts.latency_us:g} us: efficiency (step time)")
        print(format_table(rows))
    return result


def main(args: list[str], opts) -> None:
    if args:
        raise UsageError(f"unexpected arguments {args}")
    if not opts.predict:
        raise UsageError("pass --predict (the measured scaling runs are not in this version)")
    result = run_predict(opts)
    if opts.output:
        from convmixer_dist import rundir

        rundir.write_json(opts.output, result)
        print(f"Saved {opts.output}")


if __name__ == "__main__":
    from convmixer_dist import flags as cli

    cli.run_command(main, define_flags)
    sys.exit(0)
