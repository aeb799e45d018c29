"""Achieved rate per kind of op of a profiled training window, against the achievable peaks.

`profile_report` gives each kind its self time; this module gives it its work (from the run's model
shapes, `flops.step_work`) and so an achieved TFLOP/s (convolutions, head) or GB/s (BatchNorm, the
activation, the optimizer) and the fraction of the measured peak it reaches.
"""
from __future__ import annotations

import json
import os

from convmixer_dist import rundir


def kind_rates(kinds_ms: dict, steps: int | None, work: dict, peak_tflops: float | None,
               peak_gbps: float | None) -> dict:
    """{kind: {"tflops" or "gbps", "of_peak"}} for the kinds with work (see `flops.step_work`) and
    time; `of_peak` is None without the peak."""
    rates = {}
    for kind, amount in work.items():
        ms = kinds_ms.get(kind, 0.0)
        if not steps or ms <= 0:
            continue
        unit, scale, peak = (("tflops", 1e12, peak_tflops) if "flops" in amount
                             else ("gbps", 1e9, peak_gbps))
        rate = next(iter(amount.values())) * steps / (ms / 1e3) / scale
        rates[kind] = {unit: rate, "of_peak": rate / peak if peak else None}
    return rates


def run_work(paths: list[str]) -> tuple[dict, str | None]:
    """`flops.step_work` of the run that wrote the profile (MODEL_DIR/plugins/profile/RUN/*.xplane.pb,
    MODEL_DIR with flags.txt) and its precision policy; ({}, None) if no flags.txt is found there."""
    from convmixer_dist.commands.saved_run import load_run_config
    from convmixer_dist.perf import flops
    from convmixer_dist.precision import resolve_precision

    run_dir = os.path.dirname(os.path.abspath(paths[0]))
    candidates = [os.path.dirname(os.path.dirname(os.path.dirname(run_dir))), run_dir]
    model_dir = next((d for d in candidates if os.path.isfile(os.path.join(d, rundir.FLAGS_FILE))), None)
    if model_dir is None:
        return {}, None
    config = load_run_config(model_dir)
    try:  # the policy the run resolved (auto) is in its summary
        with open(os.path.join(model_dir, "summary.json")) as f:
            policy = json.load(f)["precision"]
    except (OSError, ValueError, KeyError):
        policy = resolve_precision(config.precision, "cpu", hidden_dim=config.hidden_dim)
    work = flops.step_work(config.hidden_dim, config.depth, config.kernel_size, config.patch_size,
                           config.image_size, config.num_classes, config.global_batch_size,
                           element_bytes=2 if policy.startswith("mixed") else 4)
    return work, policy


def measure_peaks(policy: str, peak_tflops: float, peak_gbps: float) -> dict:
    """The peaks the rates are compared with: the flags' where given (> 0), else measured now."""
    from convmixer_dist.perf import flops

    return {"peak_tflops": peak_tflops or flops.measure_matmul_tflops(policy)["tflops"],
            "peak_tflops_source": "--peak_tflops" if peak_tflops else
            f"measured ({flops.MATMUL_DTYPES.get(policy, policy)} matmul)",
            "peak_gbps": peak_gbps or flops.measure_memory_gbps()["gbps"],
            "peak_gbps_source": "--peak_gbps" if peak_gbps else "measured (float32 x * a + b)"}
