"""Model FLOPs (computed from the model, checked against a closed form) and device peak FLOP/s for MFU.

Convention (the one MFU figures use): a multiply-add counts as 2 FLOPs, and only the convolutions
and the dense head count; bias adds, BatchNorm, activations and pooling are elementwise work that is
bound by memory bandwidth, not by the arithmetic units, and is left out. A training step costs 3x the
forward pass (forward, gradient w.r.t. activations, gradient w.r.t. weights).

`model_flops(model)` walks the built Keras model's layers and their shapes; `convmixer_flops(...)` is
the closed form from the paper's architecture. TensorFlow's own per-op FLOP statistics
(`graph_flops`) agree with both (tests/test_flops.py).
"""
from __future__ import annotations

import collections
import re
import statistics

# Dense peak throughput per GPU in TFLOP/s (vendor datasheets, no sparsity). float32 on Ampere and
# newer is TF32 on the tensor cores, which TensorFlow enables by default for matmuls and convolutions.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100": {"float32": 494.7, "mixed_bfloat16": 989.4, "mixed_float16": 989.4},  # SXM
    "A100": {"float32": 156.0, "mixed_bfloat16": 312.0, "mixed_float16": 312.0},
    "L4": {"float32": 60.0, "mixed_bfloat16": 121.0, "mixed_float16": 121.0},
    "A10": {"float32": 62.5, "mixed_bfloat16": 125.0, "mixed_float16": 125.0},
    "V100": {"float32": 15.7, "mixed_bfloat16": 0.0, "mixed_float16": 125.0},  # no bf16 units
    "T4": {"float32": 8.1, "mixed_bfloat16": 0.0, "mixed_float16": 65.0},
}
TRAINING_MULTIPLIER = 3


def convmixer_flops(hidden_dim: int, depth: int, kernel_size: int, patch_size: int, image_size: int,
                    num_classes: int, channels: int = 3) -> int:
    """Forward FLOPs per image of a ConvMixer, closed form.

    patch embedding: 2·n²·p²·c·h; per block: depthwise 2·n²·h·k² + pointwise 2·n²·h²; head 2·h·classes,
    with n = image_size // patch_size the side of the feature map ('valid' stem with stride p).
    """
    n = image_size // patch_size
    stem = 2 * n * n * patch_size * patch_size * channels * hidden_dim
    block = 2 * n * n * hidden_dim * kernel_size * kernel_size + 2 * n * n * hidden_dim * hidden_dim
    return stem + depth * block + 2 * hidden_dim * num_classes


# Minimum memory traffic of the element-wise layers per feature-map element, in tensors read or
# written once: forward x -> y (2), backward x, dy -> dx (3). AdamW per trainable weight: reads the
# weight, its gradient and both moments, writes the weight and both moments (7, float32).
ELEMENTWISE_PASSES = 5
OPTIMIZER_PASSES = 7


def trainable_params(hidden_dim: int, depth: int, kernel_size: int, patch_size: int,
                     num_classes: int, channels: int = 3) -> int:
    """Trainable weights of a ConvMixer (BatchNorm's moving statistics excluded), closed form."""
    h = hidden_dim
    stem = patch_size * patch_size * channels * h + h + 2 * h
    block = kernel_size * kernel_size * h + h + 2 * h + h * h + h + 2 * h
    return stem + depth * block + h * num_classes + num_classes


def step_work(hidden_dim: int, depth: int, kernel_size: int, patch_size: int, image_size: int,
              num_classes: int, batch: int, element_bytes: int = 4, channels: int = 3
              ) -> dict[str, dict[str, int]]:
    """Work of one training step of `batch` images per kind of op (profile_report's kinds):
    {"flops": N} for the convolutions and the head, {"bytes": N} for the element-wise kinds.

    FLOPs are the forward's x 3 (forward, input gradient, weight gradient), except the stem, whose
    input gradient is never computed (x 2). Bytes are the minimum traffic (ELEMENTWISE_PASSES tensors
    of `element_bytes` per feature-map element and layer; the optimizer's OPTIMIZER_PASSES float32
    tensors per weight): a kernel that moves more, or is slower than memory, shows as a lower GB/s.
    """
    n = image_size // patch_size
    elements = batch * n * n * hidden_dim  # one feature map
    eltwise = (1 + 2 * depth) * ELEMENTWISE_PASSES * elements * element_bytes
    params = trainable_params(hidden_dim, depth, kernel_size, patch_size, num_classes, channels)
    return {
        "pointwise_conv": {"flops": 3 * depth * 2 * elements * hidden_dim},
        "depthwise_conv": {"flops": 3 * depth * 2 * elements * kernel_size * kernel_size},
        "stem_conv": {"flops": 2 * 2 * elements * patch_size * patch_size * channels},
        "head": {"flops": 3 * 2 * batch * hidden_dim * num_classes},
        "activation": {"bytes": eltwise},
        "batch_norm": {"bytes": eltwise},
        "optimizer": {"bytes": OPTIMIZER_PASSES * 4 * params},
    }


def layer_flops(model) -> dict[str, int]:
    """Forward FLOPs per image of each Conv2D / DepthwiseConv2D / Dense layer, by layer name."""
    import keras

    result = {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            kh, kw, _, _ = layer.kernel.shape  # c_out = c_in * depth multiplier
            _, h, w, c_out = layer.output.shape
            result[layer.name] = 2 * h * w * c_out * kh * kw
        elif isinstance(layer, keras.layers.Conv2D):
            kh, kw, c_in, c_out = layer.kernel.shape
            _, h, w, _ = layer.output.shape
            result[layer.name] = 2 * h * w * c_out * kh * kw * c_in
        elif isinstance(layer, keras.layers.Dense):
            c_in, c_out = layer.kernel.shape
            result[layer.name] = 2 * c_in * c_out
    return result


def model_flops(model) -> int:
    """Forward FLOPs per image of `model` (see the module docstring for what counts)."""
    return sum(layer_flops(model).values())


def graph_flops(model, image_size: int, channels: int = 3) -> dict[str, int]:
    """TensorFlow's own FLOP statistics of the inference graph (batch 1), summed per op type.

    An independent count: TF registers FLOP formulas per op type (used by its profiler); the conv
    and matmul entries must equal `model_flops`, the rest are the elementwise ops it leaves out.
    """
    import tensorflow as tf
    from tensorflow.python.framework import ops

    spec = tf.TensorSpec([1, image_size, image_size, channels], tf.float32)
    graph = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec).graph
    totals: collections.Counter = collections.Counter()
    for op in graph.get_operations():
        try:
            value = ops.get_stats_for_node_def(graph, op.node_def, "flops").value
        except (ValueError, TypeError):  # No FLOP formula registered, or unknown shapes.
            continue
        if value:
            totals[op.type] += int(value)
    return dict(totals)


# CPU peak, float32: cores x clock x fp32 lanes per FMA x FMA units per core x 2 FLOPs per FMA.
# The lanes are those of the vector *datapath*, which is not always the instruction set's width:
# AMD Zen 4 runs AVX-512 on 256-bit units (a 512-bit FMA takes two), Zen 2/3 and Intel's AVX2 parts
# are 256-bit, Zen 1 128-bit. `_DATAPATH_BITS` knows the x86 families where the datapath is narrower
# than the ISA; elsewhere the ISA width is assumed. Two FMA units per core is an assumption (Zen 2-5
# and Intel cores since Haswell have two; some Xeon Silver/Bronze and laptop parts one), and so is
# the clock: the highest frequency the kernel reports, under a hypervisor often the nominal one,
# not turbo. Hence `measure_matmul_tflops`: the achievable peak, measured.
CPU_FMA_UNITS = 2
_SIMD_FP32_LANES = (("avx512f", 16), ("avx2", 8), ("avx", 8), ("sse2", 4))
# (vendor, family, first model, last model) -> vector datapath width in bits, from AMD's and the
# public microarchitecture descriptions of each family.
_DATAPATH_BITS = (
    (("AuthenticAMD", 0x17, 0x00, 0x2F), 128, "Zen 1/Zen+"),
    (("AuthenticAMD", 0x17, 0x30, 0xFF), 256, "Zen 2"),
    (("AuthenticAMD", 0x19, 0x00, 0xFF), 256, "Zen 3/Zen 4"),
)


def _cpuinfo_fields(cpuinfo: str) -> tuple[set, list[float], dict[str, str]]:
    """Flags, the "cpu MHz" values and the first value of every other key of /proc/cpuinfo text."""
    flags, mhz, first = set(), [], {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("flags", "Features"):
            flags.update(value.split())
        elif key == "cpu MHz":
            try:
                mhz.append(float(value))
            except ValueError:
                pass
        elif key:
            first.setdefault(key, value.strip())
    return flags, mhz, first


def _datapath(first: dict[str, str], isa_bits: int) -> tuple[int, str]:
    """Vector datapath bits of the described core and why: a known family's, else the ISA width."""
    try:
        vendor, family, model = first.get("vendor_id", ""), int(first["cpu family"]), int(first["model"])
    except (KeyError, ValueError):
        return isa_bits, "ISA width"
    for (v, f, low, high), bits, name in _DATAPATH_BITS:
        if vendor == v and family == f and low <= model <= high:
            return min(bits, isa_bits), f"{bits}-bit datapath of {name}"
    return isa_bits, "ISA width"


def cpu_peak(cpuinfo: str, cores: int, max_mhz: float | None = None) -> tuple[float, str] | None:
    """Nominal float32 vector peak TFLOP/s of `cores` cores described by /proc/cpuinfo text, and the
    formula with its assumptions.

    `max_mhz` (e.g. from cpufreq's cpuinfo_max_freq) wins over cpuinfo's "cpu MHz" lines. None when
    the clock or the vector width cannot be read (other architectures): pass --peak_tflops there.
    """
    flags, mhz, first = _cpuinfo_fields(cpuinfo)
    clock = max_mhz or (max(mhz) if mhz else None)
    isa_lanes = next((n for flag, n in _SIMD_FP32_LANES if flag in flags), None)
    fma = CPU_FMA_UNITS if "fma" in flags or "avx512f" in flags else 1
    if not clock or not isa_lanes or cores < 1:
        return None
    bits, why = _datapath(first, 32 * isa_lanes)
    lanes = bits // 32
    flops_per_cycle = lanes * fma * 2
    tflops = cores * clock * 1e6 * flops_per_cycle / 1e12
    return tflops, (f"{cores} cores x {clock / 1000:.2f} GHz x {lanes} fp32 lanes ({why}) x {fma} FMA "
                    f"units x 2 FLOPs = {tflops:.3f} TFLOP/s (assumed: {fma} FMA units per core, this "
                    f"clock)")


def read_cpu_peak(cores: int) -> tuple[float, str] | None:
    """`cpu_peak` of this machine (/proc/cpuinfo and cpufreq); None where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            cpuinfo = f.read()
    except OSError:
        return None
    max_mhz = None
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq") as f:
            max_mhz = int(f.read()) / 1000
    except (OSError, ValueError):
        pass
    return cpu_peak(cpuinfo, cores, max_mhz)


def peak_tflops(device_name: str, policy: str) -> float | None:
    """Datasheet peak TFLOP/s of a GPU named like "NVIDIA A100-SXM4-80GB" for a precision policy."""
    for key, peaks in PEAK_TFLOPS.items():
        if re.search(rf"\b{key}\b", device_name.upper()):  # "A10" must not match "A100", "L4" not "L40S"
            return peaks.get(policy) or None
    return None


MATMUL_DTYPES = {"float32": "float32", "mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}
PEAK_MATMUL_SIZE = 2048  # 17 GFLOP per product: long enough for a CPU, chained for a GPU


def measure_matmul_tflops(policy: str = "float32", size: int = PEAK_MATMUL_SIZE, windows: int = 3,
                          device: str | None = None, window_seconds: float = 0.3) -> dict:
    """The achievable peak: TFLOP/s of a square matmul chain through TensorFlow in the compute dtype
    of the precision `policy`, on `device` (default placement if None), timed like the benchmark's
    runs (an untimed warm-up window, then the median of `windows` windows).

    One window is a tf.function computing x <- x @ b `chain` times (b scaled by 1/sqrt(size), so the
    values stay in range), `chain` calibrated so that a window lasts about `window_seconds`.
    Returns {"tflops", "tflops_max", "dtype", "size", "chain", "window_seconds"}.
    """
    import math
    import time

    import tensorflow as tf

    from convmixer_dist.perf.timing import time_calls

    dtype = MATMUL_DTYPES.get(policy, policy)
    with tf.device(device):
        a = tf.cast(tf.random.stateless_normal([size, size], seed=[1, 2]), dtype)
        b = tf.cast(tf.random.stateless_normal([size, size], seed=[3, 4]) / math.sqrt(size), dtype)

        @tf.function
        def product_chain(x, chain):
            for _ in tf.range(chain):
                x = tf.linalg.matmul(x, b)
            return x[0, 0]

        def run(chain: int):
            float(product_chain(a, tf.constant(chain)))  # the host waits for the result

        run(1)  # trace
        start = time.perf_counter()
        run(1)
        chain = max(1, round(window_seconds / max(time.perf_counter() - start, 1e-6)))
        seconds = time_calls(lambda: run(chain), 1, windows)
    flops = 2.0 * size ** 3 * chain
    return {"tflops": flops / statistics.median(seconds) / 1e12, "tflops_max": flops / min(seconds) / 1e12,
            "dtype": dtype, "size": size, "chain": chain, "window_seconds": seconds}


PEAK_STREAM_ELEMENTS = 1 << 24  # 64 MiB of float32 per tensor: far beyond the caches


def measure_memory_gbps(elements: int = PEAK_STREAM_ELEMENTS, windows: int = 3,
                        device: str | None = None, window_seconds: float = 0.3) -> dict:
    """The achievable memory bandwidth for element-wise work: GB/s of x <- x * a + b over `elements`
    float32 values through TensorFlow (one read and one write per element and pass), timed like
    `measure_matmul_tflops`. Returns {"gbps", "gbps_max", "elements", "chain", "window_seconds"}."""
    import time

    import tensorflow as tf

    from convmixer_dist.perf.timing import time_calls

    with tf.device(device):
        x0 = tf.random.stateless_uniform([elements], seed=[5, 6])

        @tf.function
        def stream_chain(x, chain):
            for _ in tf.range(chain):
                x = x * 0.5 + 0.25  # Eigen fuses the two into one pass
            return x[0]

        def run(chain: int):
            float(stream_chain(x0, tf.constant(chain)))

        run(1)
        start = time.perf_counter()
        run(1)
        chain = max(1, round(window_seconds / max(time.perf_counter() - start, 1e-6)))
        seconds = time_calls(lambda: run(chain), 1, windows)
    moved = 2.0 * 4 * elements * chain
    return {"gbps": moved / statistics.median(seconds) / 1e9, "gbps_max": moved / min(seconds) / 1e9,
            "elements": elements, "chain": chain, "window_seconds": seconds}
