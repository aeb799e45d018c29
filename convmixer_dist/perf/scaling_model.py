"""Scaling arithmetic: a model of data-parallel step time on N GPUs, and the measured runs' derived
numbers (efficiencies, the compute/communication split, bytes per step). Pure Python, no TensorFlow.

The model (`perf.scaling --predict`) is arithmetic, not a measurement. Weak scaling (a fixed batch
per GPU): every GPU computes its step in the single-device time `t_c` (given with --step_time_ms, or
3 x forward FLOPs x batch / (peak x MFU)), then the gradient (the model's trainable parameters x the
reduction dtype's size) is all-reduced:
- ring: one ring over all N GPUs. A ring all-reduce sends and receives 2(N-1)/N of the gradient per
  GPU; across nodes every node's network link carries that much, so
  t = 2(N-1)/N x S / B_node + 2(N-1) x latency (B_nvlink instead inside one node).
- two_level: reduce-scatter over NVLink inside each node, a ring all-reduce of each GPU's 1/g shard
  across the M = N/g nodes (the g shards share the node's network link), all-gather over NVLink:
  t = 2(g-1)/g x S / B_nvlink + 2(M-1)/M x S / B_node + 2(M-1) x latency.
- no overlap: the gradient as one all-reduce after the backward pass, step = t_c + t_comm. With
  overlap (buckets all-reduced as the backward pass produces them, last layer first): each of the
  ceil(S / bucket) all-reduces pays the latency term once; the backward pass is 2/3 of t_c (training
  = 3 x forward FLOPs); all but the last bucket can hide under it, the last one (the first layers'
  gradients, produced last: one bucket's bytes plus the latency term, t_tail) cannot:
  step = t_c/3 + max(2t_c/3, t_comm - t_tail) + t_tail.
- compression: the gradient reduced in bfloat16/float16 halves S (the casts are not counted).
Efficiency = t_c / step. Not modelled: the network's own congestion, NCCL's protocol overheads and
chunking, stragglers, the input pipeline; NVLink latency is taken as zero.
"""
from __future__ import annotations

import dataclasses
import math

from convmixer_dist import config as cfg
from convmixer_dist import presets

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


def step_seconds(compute: float, comm: float, overlap: bool, tail: float) -> float:
    """The step time from compute, communication and (with overlap) the last bucket's seconds `tail`
    (see the module docstring)."""
    if not overlap:
        return compute + comm
    return compute / 3 + max(2 * compute / 3, comm - tail) + tail


def predict(compute: float, gradient_params: int, gpus: int, link: Link, algorithm: str, dtype: str,
            overlap: bool, bucket_bytes: float) -> dict:
    """Predicted step of one setting: communication seconds, step seconds, efficiency. Without
    overlap the gradient is one all-reduce; with it, ceil(S / bucket) all-reduces, each paying the
    latency term, the last one (a bucket's bytes and its latency) after the backward pass."""
    nbytes = gradient_params * DTYPE_BYTES[dtype]
    all_reduce = ALGORITHMS[algorithm]
    buckets = max(1, math.ceil(nbytes / bucket_bytes)) if overlap else 1
    comm = all_reduce(gpus, nbytes, link) + (buckets - 1) * all_reduce(gpus, 0.0, link)
    tail = all_reduce(gpus, min(bucket_bytes, nbytes), link)
    step = step_seconds(compute, comm, overlap, tail)
    return {"gpus": gpus, "algorithm": algorithm, "allreduce_dtype": dtype, "overlap": overlap,
            "bytes": nbytes, "buckets": buckets, "compute_ms": 1e3 * compute, "comm_ms": 1e3 * comm,
            "step_ms": 1e3 * step, "efficiency": compute / step}


def predict_table(compute: float, gradient_params: int, gpus_list, link: Link, bucket_bytes: float,
                  dtypes=("float32", "bfloat16"), algorithms=tuple(ALGORITHMS)) -> list[dict]:
    """Every combination of GPUs, algorithm, overlap and reduction dtype."""
    return [predict(compute, gradient_params, n, link, algorithm, dtype, overlap, bucket_bytes)
            for n in gpus_list for algorithm in algorithms for dtype in dtypes for overlap in (False, True)]


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




def predict_sizes(overrides: dict[str, str]) -> dict:
    """The preset of --model (default as the training flag), any size flag given overriding it."""
    model = overrides.get("model", cfg.setting_field("model").default)
    sizes = dict(presets.PRESETS[model], model=model)
    for name in ("hidden_dim", "depth", "kernel_size", "patch_size", "image_size", "num_classes"):
        if name in overrides:
            sizes[name] = int(overrides[name])
    return sizes


def run_predict(opts, gpus_list: list[int], rates: list[float], dtypes: list[str], algorithms: list[str]) -> dict:
    """The tables of `perf.scaling --predict` (printed, and returned for the JSON)."""
    p = predict_sizes(opts.overrides)
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
    result = {"model": p["model"], "sizes": p, "gradient_parameters": params, "compute_ms": 1e3 * compute,
              "compute_source": source, "per_device_batch": opts.per_device_batch, "tables": []}
    print(f"{p['model']}: {params / 1e6:.1f}M gradient parameters ({params * 4 / 1e6:.0f} MB float32); "
          f"single-device step {1e3 * compute:.1f} ms ({source}); arithmetic, not measured")
    for rate in rates:
        link = Link(opts.gpus_per_node, opts.nvlink_gbytes * 1e9, rate * 1e9 / 8 * opts.nics_per_node,
                       opts.latency_us * 1e-6)
        rows = predict_table(compute, params, gpus_list, link, opts.bucket_mb * 1e6, dtypes, algorithms)
        result["tables"].append({"link": dataclasses.asdict(link), "inter_node_gbps": rate, "rows": rows})
        print(f"\n{opts.gpus_per_node} GPUs/node, NVLink {opts.nvlink_gbytes:g} GB/s, {opts.nics_per_node} x "
              f"{rate:g} Gb/s between nodes, latency {opts.latency_us:g} us: efficiency (step time)")
        print(format_table(rows))
    return result



# Measured runs (`perf.scaling` without --predict) on N workers with B images each:
# - single: one worker (one_device) at B: images/s r_1, step t_1;
# - independent: N one-device processes at B at the same time, one core each: summed images/s r_ind,
#   mean step t_ind (what the machine allows N unconnected workers: memory bandwidth, caches, clocks);
# - strong reference: one worker at N x B: images/s r_ref;
# - multi: N workers under multi_worker, global batch N x B: images/s r_N, step t_N.
# Weak-scaling efficiency r_N / (N r_1) and r_N / r_ind; strong-scaling efficiency (the same global
# batch on N workers instead of one) r_N / (N r_ref). The step splits into compute = t_1 (the step
# at the same per-worker batch without any communication) and communication = t_N - t_1 (what the
# distribution adds: the collectives and any wait for the slower worker); against the independent
# processes, t_N - t_ind. Bytes: a ring all-reduce of P bytes sends 2(N-1)/N x P from every worker,
# so the payload measured on the wire is (bytes a worker's interface sent per step) / (2(N-1)/N),
# which includes TCP/IP and gRPC framing; the traced graph gives P itself (perf/collectives.py).

def ring_wire_fraction(workers: int) -> float:
    """Bytes each worker sends in a ring all-reduce, as a fraction of the reduced tensor's bytes."""
    return 2 * (workers - 1) / workers


def measured_row(workers: int, single: dict, independent: dict, strong: dict, multi: dict,
                 wire: dict | None, graph: dict | None, gradient_bytes: int) -> dict:
    """The derived numbers of one multi-worker run (see above). `single`, `independent`, `strong`,
    `multi`: {"images_per_sec", "step_time_ms"}; `wire`: {"tx_bytes_per_step", "rx_bytes_per_step"}
    averaged over the workers (None: not measured); `graph`: collectives.per_step's dict ("collectives", "gradient_collectives",
    "bytes", "gradient_bytes"; None: not counted)."""
    row = {
        "images_per_sec": multi["images_per_sec"], "step_time_ms": multi["step_time_ms"],
        "weak_efficiency": multi["images_per_sec"] / (workers * single["images_per_sec"]),
        "weak_efficiency_vs_independent": multi["images_per_sec"] / independent["images_per_sec"],
        "strong_speedup": multi["images_per_sec"] / strong["images_per_sec"],
        "strong_efficiency": multi["images_per_sec"] / (workers * strong["images_per_sec"]),
        "compute_ms": single["step_time_ms"], "comm_ms": multi["step_time_ms"] - single["step_time_ms"],
        "compute_ms_independent": independent["step_time_ms"],
        "comm_ms_vs_independent": multi["step_time_ms"] - independent["step_time_ms"],
        "gradient_bytes_float32": gradient_bytes,
    }
    if wire is not None:
        payload = wire["tx_bytes_per_step"] / ring_wire_fraction(workers)
        row.update(wire_tx_bytes_per_step=wire["tx_bytes_per_step"],
                   wire_rx_bytes_per_step=wire["rx_bytes_per_step"],
                   allreduced_bytes_per_step_measured=payload,
                   full_gradients_per_step_measured=payload / gradient_bytes)
    if graph is not None:
        row.update(allreduced_bytes_per_step_graph=graph["bytes"], collectives_per_step=graph["collectives"],
                   gradient_allreduced_bytes_per_step_graph=graph["gradient_bytes"],
                   gradient_collectives_per_step=graph["gradient_collectives"],
                   full_gradients_per_step_graph=graph["gradient_bytes"] / gradient_bytes)
        if wire is not None and graph["bytes"]:
            row["measured_over_graph"] = row["allreduced_bytes_per_step_measured"] / graph["bytes"]
    return row


def _megabytes(row: dict, key: str) -> str:
    return f"{row[key] / 1e6:.2f}" if row.get(key) is not None else "n/a"


def format_measured_table(rows: list[dict]) -> str:
    """One line per (variant, rate): throughput, efficiencies, the step split, bytes and collectives."""
    lines = ["variant | link | img/s | weak eff | vs indep | strong eff | step ms = compute + comm | "
             "MB/step sent (payload) | MB/step graph | collectives/step",
             "--- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---:"]
    for r in rows:
        sent = (f"{_megabytes(r, 'wire_tx_bytes_per_step')} ({_megabytes(r, 'allreduced_bytes_per_step_measured')})"
                if r.get("wire_tx_bytes_per_step") is not None else "n/a")
        collectives = (f"{r['collectives_per_step']:g} ({r['gradient_collectives_per_step']:g} gradient)"
                       if r.get("collectives_per_step") is not None else "n/a")
        lines.append(" | ".join([
            r["variant"], r["rate"], f"{r['images_per_sec']:.1f}", f"{r['weak_efficiency']:.2f}",
            f"{r['weak_efficiency_vs_independent']:.2f}", f"{r['strong_efficiency']:.2f}",
            f"{r['step_time_ms']:.0f} = {r['compute_ms']:.0f} + {r['comm_ms']:.0f}", sent,
            _megabytes(r, "allreduced_bytes_per_step_graph"), collectives]))
    return "\n".join(lines)
