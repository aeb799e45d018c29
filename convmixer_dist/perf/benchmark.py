"""End-to-end training throughput: the project's benchmark command (numbers in notes come from it).

    python -m convmixer_dist.perf.benchmark --model=convmixer_256_8 --global_batch_size=64 \
        --precision=float32 --compare_fit --output=runs/bench/256_8.json
    python -m convmixer_dist.perf.benchmark --strategy=mirrored --precision=mixed_bfloat16 --peak_tflops=312
    taskset -c 0 python -m convmixer_dist.perf.benchmark --measure=input --dataset=cifar10 --data_dir=DIR

Takes every training flag of `convmixer_dist.main` (model, strategy, precision, XLA, batch, data,
augmentation) and trains with the real training loop (`training.steps.make_train_loop`) on them:
- `custom_input_excluded`: every step reads one cached batch of the real pipeline, so only the
  model, the optimizer and the all-reduce are timed;
- `custom_input_included`: the real input pipeline feeds the steps. If it is much slower than the
  excluded run, training is input-bound;
- `fit_input_excluded` (`--compare_fit`): the same model, optimizer, loss, batch and XLA setting,
  trained by Keras `model.fit`, in the same process;
- `input` (`--measure=input` or `all`): the input pipeline alone, images/s and images/s per CPU core.

Warm-up windows (tracing, autotuning) are excluded; each run reports the median of `--windows`
windows of `--window_steps` steps. FLOPs per image come from the built model (`flops.model_flops`,
training = 3x forward), so achieved TFLOP/s and MFU (with `--peak_tflops`, the GPU table in
flops.py, or on CPU in float32 the vector peak cores x clock x SIMD lanes x 2 FMA units x 2, printed
with its assumptions) are computed, not guessed. The result is saved as JSON (`--output`).
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
from typing import Callable

from absl import flags

from convmixer_dist import config as cfg
from convmixer_dist import flags as cli
from convmixer_dist import rundir
from convmixer_dist.errors import UsageError
from convmixer_dist.perf.timing import time_calls


def define_flags() -> None:
    """The benchmark's own flags; `--help` also lists the training flags it takes."""
    flags.DEFINE_enum("measure", "train", ["train", "input", "all"], "train: the training runs; input: "
                      "the input pipeline alone; all: both.")
    flags.DEFINE_list("pipeline", ["excluded", "included"], "Training runs to make: excluded (one "
                      "cached batch per step), included (the real input pipeline), or both.")
    cli.define_number("warmup_windows", 1, 0, 1000, "Untimed windows first (tracing, tf.data autotuning).")
    cli.define_number("windows", 5, 1, 1000, "Timed windows per run; the median is reported.")
    cli.define_number("window_steps", 10, 1, 10 ** 6, "Steps per window (a multiple of --steps_per_loop).")
    flags.DEFINE_boolean("compare_fit", False, "Also train the same model with Keras model.fit on the "
                         "same cached batch and report custom/fit throughput.")
    flags.DEFINE_list("variants", [], "Extra input-excluded runs of the custom loop, each with one "
                      "setting changed, reported as a ratio to the base run (same process, same data), "
                      "e.g. precision=mixed_bfloat16,precision=mixed_float16,xla=on. Settings: "
                      + ", ".join(VARIANT_SETTINGS) + ".")
    flags.DEFINE_list("input_compare", [], "With --measure=input: more input pipelines timed in the same "
                      "run (one at a time, two passes in alternating order), reported as a ratio to the "
                      "base pipeline. Items: "
                      "decode_crop=true|false (the same data), tfrecord=DIR (the same flags reading "
                      "TFRecord shards of DIR, e.g. made from --data_dir by make_tfrecords).")
    cli.define_number("fit_steps_per_execution", 1, 1, 10 ** 6,
                      "model.fit's steps_per_execution (Keras default 1).")
    cli.define_number("peak_tflops", 0.0, 0.0, 1e6, "Device peak TFLOP/s for MFU; 0 = from the GPU "
                      "table, or on CPU (float32) cores x clock x SIMD width x 2 FMA units x 2 (see "
                      "flops.cpu_peak).")
    flags.DEFINE_boolean("measure_peak", True, "Measure the achievable peak once per run (a 2048^3 "
                         "matmul chain through TensorFlow in the run's compute dtype, timed like the "
                         "runs) and report MFU against it beside the nominal one. Skipped with "
                         "--peak_tflops, which overrides both.")
    flags.DEFINE_string("output", "runs/benchmark.json", "Where to write the JSON result.")
    flags.adopt_module_key_flags(cli)


PIPELINES = ("excluded", "included")
# Settings a --variants run may change: they leave the model, the data and the strategy as they are.
# Their types, choices and bounds are those of the Config fields (config.py).
VARIANT_SETTINGS = ("precision", "xla", "steps_per_loop", "sync_bn", "augment_on_device", "kernels")


def _variant_forms() -> str:
    """`precision=auto|float32|...` for every variant setting (for the error message)."""
    forms = []
    for name in VARIANT_SETTINGS:
        field = cfg.setting_field(name)
        values = field.metadata["choices"] or (("true", "false") if cfg.setting_type(field) == "bool"
                                               else ("N",))
        forms.append(f"{name}={'|'.join(values)}")
    return ", ".join(forms)


def parse_variants(items: list[str], config) -> list[tuple[str, object]]:
    """`["precision=mixed_bfloat16", "xla=on"]` -> [(label, config with that one setting changed)]."""
    import dataclasses

    variants, seen = [], {}
    for item in items:
        name, _, text = item.partition("=")
        try:
            if name not in VARIANT_SETTINGS:
                raise ValueError(name)
            value = cfg.value_from_text(name, text)
            cfg.check_setting(name, value)
        except (ValueError, UsageError):
            raise UsageError(f"--variants: {item!r} is not one of {_variant_forms()}") from None
        if (name, value) in seen:  # the second run's result would replace the first's in the JSON
            raise UsageError(f"--variants: {item!r} is the same variant as {seen[name, value]!r}; "
                             "list each variant once")
        seen[name, value] = item
        variants.append((item, dataclasses.replace(config, **{name: value})))
    return variants


def median_rate(seconds: list[float], images_per_window: int) -> dict:
    """Per-window images/s and the median (and spread) of a run."""
    rates = [images_per_window / s for s in seconds]
    return {"window_seconds": seconds, "window_images_per_sec": rates,
            "images_per_sec": statistics.median(rates), "images_per_sec_min": min(rates),
            "images_per_sec_max": max(rates)}


def throughput_fields(rate: dict, global_batch: int, train_flops: int, peak: float | None,
                      measured_peak: float | None = None) -> dict:
    """Step time, achieved TFLOP/s, MFU against `peak` (nominal or --peak_tflops) and `mfu_measured`
    against the measured matmul peak, from a run's median images/s."""
    images_per_sec = rate["images_per_sec"]
    achieved = images_per_sec * train_flops / 1e12
    return {**rate, "step_time_ms": 1000 * global_batch / images_per_sec,
            "achieved_tflops": achieved, "mfu": achieved / peak if peak else None,
            "peak_measured_tflops": measured_peak,
            "mfu_measured": achieved / measured_peak if measured_peak else None}


def measured_peak(result: dict, policy: str, opts) -> float | None:
    """The achievable matmul TFLOP/s in `policy`'s compute dtype, measured once per run and policy
    (cached in `result["peak_measured"]`); None with --peak_tflops or --nomeasure_peak."""
    from convmixer_dist.perf import flops

    if opts.peak_tflops or not opts.measure_peak:
        return None
    cache = result.setdefault("peak_measured", {})
    if policy not in cache:
        cache[policy] = flops.measure_matmul_tflops(policy, windows=opts.windows)
        m = cache[policy]
        print(f"measured peak ({m['dtype']}, {m['size']}^3 matmul x {m['chain']}, median of "
              f"{len(m['window_seconds'])}): {m['tflops']:.3f} TFLOP/s", flush=True)
    return cache[policy]["tflops"]


def _device_name(kind: str) -> str:
    """The GPU's marketing name, or the CPU model."""
    import tensorflow as tf

    if kind == "gpu":
        details = tf.config.experimental.get_device_details(tf.config.list_physical_devices("GPU")[0])
        return details.get("device_name", "GPU")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def device_peak(kind: str, device: str, policy: str, peak_flag: float) -> tuple[float | None, str]:
    """Peak TFLOP/s for MFU and where it comes from: --peak_tflops, the GPU table, or on CPU (float32
    only; half-precision CPU peaks depend on units like AMX that a formula would guess) the vector
    FMA formula of `flops.cpu_peak`."""
    from convmixer_dist.perf import flops

    if peak_flag:
        return peak_flag, "--peak_tflops"
    if kind == "gpu":
        peak = flops.peak_tflops(device, policy)
        return peak, "GPU datasheet table (flops.PEAK_TFLOPS)" if peak else "unknown GPU: pass --peak_tflops"
    if policy != "float32":
        return None, f"no CPU formula for {policy}: pass --peak_tflops"
    computed = flops.read_cpu_peak(len(os.sched_getaffinity(0)))
    if computed is None:
        return None, "CPU clock or vector width unreadable: pass --peak_tflops"
    return computed


def _cached_dataset_fn(config, derived, arrays) -> Callable:
    """The real pipeline's first batch per input pipeline, cached and repeated (input excluded)."""
    from convmixer_dist.data import pipeline as data

    real = data.make_dataset_fn(config, derived, "train", arrays)
    return lambda ctx: real(ctx).take(1).cache().repeat()


def _build(strategy, config, derived, policy: str):
    """Model and optimizer (slots built) in the strategy's scope under the precision `policy`."""
    import keras

    from convmixer_dist import optimization
    from convmixer_dist.model import create_model
    from convmixer_dist.strategy import device_kind

    keras.mixed_precision.set_dtype_policy(policy)
    keras.utils.set_random_seed(config.seed)
    with strategy.scope():
        model = create_model(config, device_kind(strategy))
        optimizer = optimization.create_optimizer(config, derived.total_steps, policy,
                                                  variables=model.trainable_variables)
        # Keras 3 creates slots lazily, which fails inside a distributed tf.function: build them now.
        optimizer.build(model.trainable_variables)
    return model, optimizer


def _custom_runner(strategy, model, optimizer, config, xla: bool, dataset, window_steps: int) -> Callable:
    """A window of training steps through the project's own loop (forced to finish)."""
    import tensorflow as tf

    from convmixer_dist.training.steps import make_train_loop

    train_loop = make_train_loop(strategy, model, optimizer, config, xla)
    iterator = iter(dataset)
    state = {"step": 0}
    calls = window_steps // config.steps_per_loop

    def run_window():
        for _ in range(calls):
            totals = train_loop(iterator, tf.constant(config.steps_per_loop, tf.int32),
                                tf.constant(state["step"], tf.int64), tf.constant(0, tf.int64))
            float(totals[0])  # As in training: the host reads the loss sums after every call.
            state["step"] += config.steps_per_loop
    if config.strategy == "multi_worker":  # its all-reduces per step, read from the traced loop
        from convmixer_dist.perf import collectives

        run_window.collectives = lambda: collectives.per_step(train_loop.get_concrete_function(
            iterator, tf.constant(config.steps_per_loop, tf.int32), tf.constant(0, tf.int64),
            tf.constant(0, tf.int64)), len(strategy.extended.worker_devices))
    return run_window


def _fit_runner(strategy, config, derived, arrays, policy: str, xla: bool, window_steps: int,
                steps_per_execution: int) -> Callable:
    """A window of training steps through Keras `model.fit` with the same model, optimizer and data."""
    import keras
    import tensorflow as tf

    from convmixer_dist import optimization
    from convmixer_dist.config import derive
    from convmixer_dist.model import create_model

    with strategy.scope():
        model = create_model(config)
        optimizer = optimization.create_optimizer(config, derived.total_steps, policy,
                                                  variables=model.trainable_variables)
        model.compile(optimizer=optimizer, jit_compile=xla, metrics=["accuracy"],
                      steps_per_execution=steps_per_execution,
                      loss=keras.losses.CategoricalCrossentropy(from_logits=True,
                                                                label_smoothing=config.label_smoothing))
    # One global batch of the same pipeline, cached: fit splits it over the replicas itself.
    whole = derive(config, 1, derived.train_size, derived.eval_size)
    dataset = _cached_dataset_fn(config, whole, arrays)(tf.distribute.InputContext())
    dataset = dataset.map(lambda x, y: (x, y if y.dtype.is_floating else tf.one_hot(y, config.num_classes)))

    def run_window():
        model.fit(dataset, epochs=1, steps_per_epoch=window_steps, verbose=0)
    return run_window


def parse_input_compare(items: list[str], config) -> list[tuple[str, object]]:
    """`["decode_crop=true", "tfrecord=DIR"]` -> [(label, config of that input pipeline)]."""
    import dataclasses

    out = []
    for item in items:
        name, _, value = item.partition("=")
        if name == "decode_crop" and value in ("true", "false"):
            out.append((item, dataclasses.replace(config, decode_crop=value == "true")))
        elif name == "tfrecord" and value:
            if not os.path.isdir(value):
                raise UsageError(f"--input_compare={item}: {value} is not a directory of TFRecord shards")
            out.append((item, dataclasses.replace(config, dataset="tfrecord", data_dir=value)))
        else:
            raise UsageError(f"--input_compare: {item!r} is not decode_crop=true|false or tfrecord=DIR")
    return out


def _input_rates(strategy, pipelines: list[tuple[str, object, object, object]], opts) -> dict:
    """Images/s of training input pipelines alone ((label, config, derived, arrays) each), and per
    CPU core this process may use.

    Only one pipeline is alive at a time: a live tf.data iterator keeps decoding into its prefetch
    buffers in the background, which would both slow the timed pipeline and inflate its own next
    window. Each pipeline is measured twice (pipelines in order, then in reverse), each time from a
    fresh iterator after `--warmup_windows`, so a change in machine load hits all of them alike."""
    import gc
    import time

    from convmixer_dist.data import pipeline as data

    batches = opts.window_steps
    seconds: dict[str, list[float]] = {label: [] for label, *_ in pipelines}
    cpu_seconds: dict[str, list[float]] = {label: [] for label, *_ in pipelines}
    passes = [pipelines, pipelines[::-1]] if len(pipelines) > 1 else [pipelines]
    for number, order in enumerate(passes):
        windows = len(range(number, opts.windows, len(passes)))  # split the windows over the passes
        for label, config, derived, arrays in order:
            iterator = iter(data.train_dataset(strategy, config, derived, arrays))
            for _ in range(opts.warmup_windows):
                for _ in range(batches):
                    next(iterator)
            for _ in range(windows):
                start, cpu_start = time.perf_counter(), time.process_time()
                for _ in range(batches):
                    next(iterator)
                seconds[label].append(time.perf_counter() - start)
                cpu_seconds[label].append(time.process_time() - cpu_start)
                print(f"  input {label}: window {len(seconds[label])}/{opts.windows} "
                      f"{seconds[label][-1]:.3f} s", flush=True)
            del iterator
            gc.collect()  # stop its background threads before the next pipeline is timed
    cores = len(os.sched_getaffinity(0))
    rates = {}
    for label, config, _, _ in pipelines:
        rate = median_rate(seconds[label], batches * config.global_batch_size)
        cpu_rate = median_rate(cpu_seconds[label], batches * config.global_batch_size)["images_per_sec"]
        # Images per CPU-second of this process: per core, and unaffected by other processes' load.
        rates[label] = {**rate, "cpu_cores": cores, "images_per_sec_per_core": rate["images_per_sec"] / cores,
                        "images_per_cpu_second": cpu_rate, "window_cpu_seconds": cpu_seconds[label],
                        "dataset": config.dataset, "decode_crop": config.decode_crop,
                        "augment": config.augment, "augment_on_device": config.augment_on_device}
    return rates


def _input_runs(result: dict, strategy, config, derived, arrays, opts) -> None:
    """`input_pipeline` (the configured pipeline) and `input_compare` (--input_compare) into `result`."""
    import dataclasses

    from convmixer_dist.data import pipeline as data
    from convmixer_dist.config import derive

    pipelines = [("base", config, derived, arrays)]
    for label, other in parse_input_compare(opts.input_compare, config):
        same_data = dataclasses.replace(other, decode_crop=config.decode_crop) == config
        other_loaded = arrays if same_data else data.load(other)
        pipelines.append((label, other, derive(other, strategy.num_replicas_in_sync,
                                               *data.trained_sizes(other, other_loaded)), other_loaded))
    rates = _input_rates(strategy, pipelines, opts)
    result["input_pipeline"] = rates.pop("base")
    if rates:
        result["input_compare"] = rates
    base = result["input_pipeline"]["images_per_sec"]
    base_cpu = result["input_pipeline"]["images_per_cpu_second"]
    for label, rate in [("input pipeline", result["input_pipeline"]), *rates.items()]:
        rate["over_base"] = rate["images_per_sec"] / base
        rate["cpu_over_base"] = rate["images_per_cpu_second"] / base_cpu
        ratio = ("" if label == "input pipeline" else
                 f" ({rate['over_base']:.2f}x base; per CPU-second {rate['cpu_over_base']:.2f}x)")
        print(f"{label}: {rate['images_per_sec']:,.0f} img/s on {rate['cpu_cores']} core(s) = "
              f"{rate['images_per_sec_per_core']:,.0f} img/s/core, {rate['images_per_cpu_second']:,.0f} "
              f"img per CPU-second{ratio}", flush=True)


def validate_benchmark_flags(config, opts) -> list[tuple[str, object]]:
    """One-line errors for benchmark flags that cannot work together; returns the parsed --variants."""
    bad = [p for p in opts.pipeline if p not in PIPELINES]
    if bad or not opts.pipeline:
        raise UsageError(f"--pipeline={','.join(opts.pipeline)}: expected excluded, included or both")
    if opts.window_steps % config.steps_per_loop:
        raise UsageError(f"--window_steps={opts.window_steps} must be a multiple of "
                         f"--steps_per_loop={config.steps_per_loop}")
    if opts.compare_fit and config.augment_on_device:
        raise UsageError("--compare_fit: model.fit cannot run --augment_on_device; drop one of them")
    variants = parse_variants(opts.variants, config)
    if opts.input_compare and opts.measure == "train":
        raise UsageError("--input_compare times input pipelines: add --measure=input (or all)")
    parse_input_compare(opts.input_compare, config)
    for label, variant in variants:
        if opts.window_steps % variant.steps_per_loop:
            raise UsageError(f"--variants={label}: --window_steps={opts.window_steps} must be a "
                             f"multiple of its steps_per_loop")
    if opts.variants and "excluded" not in opts.pipeline:
        raise UsageError("--variants are compared with the input-excluded run: add excluded to --pipeline")
    rundir.ensure_writable_file(opts.output, f"--output={opts.output}")
    return variants


def _result_header(config, derived, model, kind: str, policy: str, xla: bool, peak, opts) -> dict:
    """The JSON result's description of the model, the setup and the FLOPs (runs are added later)."""
    import keras
    import tensorflow as tf

    from convmixer_dist.fused import resolve_kernels
    from convmixer_dist.model import count_params
    from convmixer_dist.perf import flops

    forward = flops.model_flops(model)
    return {
        "model": {"name": config.model, "hidden_dim": config.hidden_dim, "depth": config.depth,
                  "kernel_size": config.kernel_size, "patch_size": config.patch_size,
                  "image_size": config.image_size, "num_classes": config.num_classes,
                  "parameters": count_params(model)},
        "setup": {"strategy": config.strategy, "replicas": derived.num_replicas, "device_kind": kind,
                  "device": _device_name(kind), "precision": policy, "xla": xla,
                  "kernels": resolve_kernels(config.kernels, kind).name,
                  "global_batch_size": config.global_batch_size, "steps_per_loop": config.steps_per_loop,
                  "dataset": config.dataset, "augment": config.augment,
                  "augment_on_device": config.augment_on_device, "warmup_windows": opts.warmup_windows,
                  "windows": opts.windows, "window_steps": opts.window_steps,
                  "cpu_cores": len(os.sched_getaffinity(0)), "tensorflow": tf.__version__,
                  "keras": keras.__version__, "python": platform.python_version(),
                  "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])},
        "flops_per_image_forward": forward, "flops_per_image_train": flops.TRAINING_MULTIPLIER * forward,
        "peak_tflops": peak, "runs": {},
    }


def _record(result: dict, name: str, run_window: Callable, config, opts, policy: str,
            nominal: bool = True) -> None:
    """Time `run_window` (warm-up, then --windows windows) and add the run to `result["runs"]`.
    `nominal`: the run's precision is the base run's, whose nominal peak `result["peak_tflops"]` is."""
    peak = result["peak_tflops"] if nominal else None
    achievable = measured_peak(result, policy, opts)
    seconds = time_calls(run_window, opts.warmup_windows, opts.windows, name)
    run = throughput_fields(median_rate(seconds, opts.window_steps * config.global_batch_size),
                            config.global_batch_size, result["flops_per_image_train"], peak, achievable)
    result["runs"][name] = run
    if hasattr(run_window, "collectives"):
        run["collectives"] = run_window.collectives()
    mfu = f", MFU {run['mfu']:.1%} of {peak:.3f}" if run["mfu"] is not None else ", MFU n/a"
    if run["mfu_measured"] is not None:
        mfu += f" nominal, {run['mfu_measured']:.1%} of {achievable:.3f} measured"
    print(f"{name}: {run['images_per_sec']:,.1f} img/s (median of {opts.windows}), step "
          f"{run['step_time_ms']:.1f} ms, {run['achieved_tflops']:.3f} TFLOP/s{mfu}", flush=True)


def _training_runs(result: dict, strategy, setup: dict, variants, opts) -> None:
    """The custom-loop runs (input excluded/included), model.fit, and one run per variant."""
    import keras

    from convmixer_dist.data import pipeline as data
    from convmixer_dist.fused import resolve_kernels
    from convmixer_dist.precision import resolve_precision, use_xla

    config, derived, arrays = setup["config"], setup["derived"], setup["arrays"]
    kind, policy, xla = setup["kind"], setup["policy"], setup["xla"]
    for pipeline in opts.pipeline:
        dataset = (strategy.distribute_datasets_from_function(_cached_dataset_fn(config, derived, arrays))
                   if pipeline == "excluded" else data.train_dataset(strategy, config, derived, arrays))
        _record(result, f"custom_input_{pipeline}", _custom_runner(
            strategy, setup["model"], setup["optimizer"], config, xla, dataset, opts.window_steps),
            config, opts, policy)
    if opts.compare_fit:
        _record(result, "fit_input_excluded", _fit_runner(
            strategy, config, derived, arrays, policy, xla, opts.window_steps, opts.fit_steps_per_execution),
            config, opts, policy)
    for label, variant in variants:
        v_policy = resolve_precision(variant.precision, kind, hidden_dim=variant.hidden_dim)
        v_xla = use_xla(variant, kind)
        v_model, v_optimizer = _build(strategy, variant, derived, v_policy)
        dataset = strategy.distribute_datasets_from_function(_cached_dataset_fn(variant, derived, arrays))
        _record(result, f"custom_input_excluded[{label}]", _custom_runner(
            strategy, v_model, v_optimizer, variant, v_xla, dataset, opts.window_steps),
            config, opts, v_policy, nominal=v_policy == policy or bool(opts.peak_tflops))
        result["runs"][f"custom_input_excluded[{label}]"].update(
            precision=v_policy, xla=v_xla, kernels=resolve_kernels(variant.kernels, kind).name)
    keras.mixed_precision.set_dtype_policy(policy)  # The variants changed it; back to the base run's.


def _add_ratios(result: dict, variant_labels: list[str]) -> None:
    """Variant/base, custom/fit and included/excluded throughput ratios of the runs made."""
    runs = result["runs"]
    if "custom_input_excluded" in runs and variant_labels:
        base = runs["custom_input_excluded"]["images_per_sec"]
        result["variant_over_base"] = {label: runs[f"custom_input_excluded[{label}]"]["images_per_sec"] / base
                                       for label in variant_labels}
        for label, ratio in result["variant_over_base"].items():
            print(f"{label} / base: {ratio:.2f}x", flush=True)
    if "custom_input_excluded" in runs and "fit_input_excluded" in runs:
        result["custom_over_fit"] = (runs["custom_input_excluded"]["images_per_sec"]
                                     / runs["fit_input_excluded"]["images_per_sec"])
        print(f"custom loop / model.fit: {result['custom_over_fit']:.2f}x", flush=True)
    if "custom_input_excluded" in runs and "custom_input_included" in runs:
        # < 1: the input pipeline slows training down (input-bound); ~1: it keeps up.
        result["included_over_excluded"] = (runs["custom_input_included"]["images_per_sec"]
                                            / runs["custom_input_excluded"]["images_per_sec"])
        print(f"input included / excluded: {result['included_over_excluded']:.2f}", flush=True)


def run_benchmark(config, variants: list[tuple[str, object]], opts) -> dict:
    """Every requested measurement for `config` (and its `variants`); returns the JSON-ready result.
    The process's Keras dtype policy is restored afterwards."""
    import keras

    previous_policy = keras.mixed_precision.dtype_policy()
    try:
        return _run_benchmark(config, variants, opts)
    finally:
        keras.mixed_precision.set_dtype_policy(previous_policy)


def _run_benchmark(config, variants: list[tuple[str, object]], opts) -> dict:
    from convmixer_dist import strategy as strategy_lib
    from convmixer_dist.plan import plan

    strategy = strategy_lib.create_strategy(config)  # Before any other op (multi_worker needs it).
    run_plan = plan(config, strategy)
    kind, policy, xla = run_plan.device_kind, run_plan.policy, run_plan.xla
    arrays, derived = run_plan.loaded, run_plan.derived

    peak, peak_source = device_peak(kind, _device_name(kind), policy, opts.peak_tflops)
    print(f"peak for MFU: {peak_source}", flush=True)
    model, optimizer = _build(strategy, config, derived, policy)
    result = _result_header(config, derived, model, kind, policy, xla, peak, opts)
    result["peak_source"] = peak_source
    if opts.measure in ("train", "all"):
        setup = dict(config=config, derived=derived, arrays=arrays, kind=kind, policy=policy, xla=xla,
                     model=model, optimizer=optimizer)
        _training_runs(result, strategy, setup, variants, opts)
    if opts.measure in ("input", "all"):
        _input_runs(result, strategy, config, derived, arrays, opts)
    _add_ratios(result, opts.variants)
    rundir.write_json(opts.output, result)
    print(f"Saved {opts.output}", flush=True)
    return result


def main(args: list[str], opts) -> None:
    if args:
        raise UsageError(f"unexpected arguments {args}")
    config = cli.config_from_flags()
    variants = validate_benchmark_flags(config, opts)
    from convmixer_dist.runtime import quiet_tensorflow_import

    quiet_tensorflow_import()
    run_benchmark(config, variants, opts)


if __name__ == "__main__":
    cli.run_command(main, define_flags, training=True)
