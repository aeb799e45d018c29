"""Mixed precision: choose the Keras dtype policy per device and wrap the optimizer when needed.

`auto` picks mixed_bfloat16 on GPUs with compute capability >= 8.0 (Ampere+, bf16 tensor cores, no
loss scaling needed), mixed_float16 on 7.x (Volta/Turing tensor cores, dynamic loss scaling). On a
CPU it picks mixed_bfloat16 only where two things hold: the CPU has bf16 units (its flags say
avx512_bf16 or amx_bf16) and this project measured bfloat16 training faster than float32 on that
kind of CPU (`BF16_MEASURED_FASTER`: vendor, family and model range, with the measurement) for a
model of the size measured (hidden_dim >= `BF16_MIN_HIDDEN_DIM`; narrower 1x1 convolutions gain less
than the casts and reorders cost: 0.64x measured at hidden_dim 64); else float32 (on the other CPUs
measured bfloat16 was slower, or they have no bf16 units; float16 ran at 0.34x). `precision_choice`
says which and why; the training command prints it.
"""
from __future__ import annotations

import keras
import tensorflow as tf

from convmixer_dist.config import Config


def gpu_compute_capabilities() -> list[tuple[int, int]]:
    """Compute capability of each visible GPU (empty without GPUs)."""
    caps = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        caps.append(tuple(details.get("compute_capability", (0, 0))))
    return caps


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# CPU kinds where `python -m convmixer_dist.perf.benchmark --strategy=one_device --global_batch_size=64
# --pipeline=excluded --precision=float32 --variants=precision=mixed_bfloat16` (ConvMixer-256/8,
# quiet machine) measured mixed_bfloat16 faster than float32: (vendor_id, cpu family, first model,
# last model) -> the measurement. A CPU kind not listed keeps float32 until measured.
BF16_MIN_HIDDEN_DIM = 256
BF16_MEASURED_FASTER = {
    ("AuthenticAMD", 0x1A, 0x00, 0x1F): "AMD Zen 5 EPYC (family 26, AVX512-BF16): bfloat16 1.46x "
                                        "and 1.73x float32 in two runs (2 cores, 2026-12-08)",
}


def _cpu_kind(cpuinfo: str) -> tuple[str, int, int, set]:
    """(vendor_id, cpu family, model, flags) of the first CPU described by /proc/cpuinfo text."""
    fields, flags = {}, set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags":
            flags.update(value.split())
        else:
            fields.setdefault(key, value.strip())
    try:
        return fields.get("vendor_id", ""), int(fields["cpu family"]), int(fields["model"]), flags
    except (KeyError, ValueError):
        return fields.get("vendor_id", ""), -1, -1, flags


def read_cpuinfo() -> str:
    """/proc/cpuinfo, or "" where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def cpu_precision(cpuinfo: str, hidden_dim: int | None = None) -> tuple[str, str]:
    """auto's policy on the CPU described by `cpuinfo` for a ConvMixer of `hidden_dim` channels
    (None: the size measured) and why."""
    vendor, family, model, flags = _cpu_kind(cpuinfo)
    units = [f for f in BF16_CPU_FLAGS if f in flags]
    if not units:
        return "float32", "no bf16 units on this CPU (no avx512_bf16 or amx_bf16 flag)"
    for (v, f, low, high), measured in BF16_MEASURED_FASTER.items():
        if vendor == v and family == f and low <= model <= high:
            if hidden_dim is not None and hidden_dim < BF16_MIN_HIDDEN_DIM:
                return "float32", (f"bf16 units ({units[0]}), measured faster on this CPU kind from "
                                   f"hidden_dim {BF16_MIN_HIDDEN_DIM}, not at {hidden_dim}")
            return "mixed_bfloat16", f"bf16 units ({units[0]}) and measured faster here: {measured}"
    return "float32", (f"bf16 units ({units[0]}) but no measurement of bfloat16 training faster on this "
                       f"CPU kind ({vendor} family {family} model {model}); --precision=mixed_bfloat16 "
                       "forces it")


def precision_choice(requested: str, device_kind: str, capabilities: list[tuple[int, int]] | None = None,
                     cpuinfo: str | None = None, hidden_dim: int | None = None) -> tuple[str, str]:
    """`--precision` (auto|float32|mixed_float16|mixed_bfloat16) -> (Keras policy name, why), for a
    model of `hidden_dim` channels on a CPU (None: the size measured)."""
    if requested != "auto":
        return requested, "--precision"
    if device_kind != "gpu":
        return cpu_precision(read_cpuinfo() if cpuinfo is None else cpuinfo, hidden_dim)
    capabilities = gpu_compute_capabilities() if capabilities is None else capabilities
    lowest = min(capabilities) if capabilities else (0, 0)
    if lowest >= (8, 0):
        return "mixed_bfloat16", f"GPU compute capability {lowest} >= 8.0 (bf16 tensor cores)"
    if lowest >= (7, 0):
        return "mixed_float16", f"GPU compute capability {lowest} (float16 tensor cores)"
    return "float32", f"GPU compute capability {lowest} < 7.0"


def resolve_precision(requested: str, device_kind: str, capabilities: list[tuple[int, int]] | None = None,
                      cpuinfo: str | None = None, hidden_dim: int | None = None) -> str:
    """Map `--precision` to a concrete Keras policy name (see `precision_choice`)."""
    return precision_choice(requested, device_kind, capabilities, cpuinfo, hidden_dim)[0]


def uses_loss_scaling(policy: str) -> bool:
    """float16 has too little range for small gradients; bfloat16 has float32's range."""
    return policy == "mixed_float16"


def wrap_optimizer(optimizer: keras.optimizers.Optimizer, policy: str) -> keras.optimizers.Optimizer:
    """Dynamic loss scaling for float16 (non-finite steps are skipped and the scale lowered)."""
    if uses_loss_scaling(policy):
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def use_xla(config: Config, kind: str) -> bool:
    """XLA for the per-replica forward/backward: on GPUs by default, off on CPU (~7x slower there)."""
    return config.xla == "on" or (config.xla == "auto" and kind == "gpu")

