"""End-to-end training throughput: the project's benchmark command (numbers in notes come from it).

    python -m convmixer_dist.benchmark --model=convmixer_256_8 --global_batch_size=64 \
        --precision=float32 --compare_fit --output=runs/bench/256_8.json
    python -m convmixer_dist.benchmark --strategy=mirrored --precision=mixed_bfloat16 --peak_tflops=312
    taskset -c 0 python -m convmixer_dist.benchmark --measure=input --dataset=cifar10 --data_dir=DIR

Takes every training flag of `convmixer_dist.main` (model, strategy, precision, XLA, batch, data,
augmentation) and trains with the real training loop (`train.make_train_loop`) on them:
- `custom_input_excluded`: every step reads one cached batch of the real pipeline, so only the
  model, the optimizer and the all-reduce are timed;
- `custom_input_included`: the real input pipeline feeds the steps. If it is much slower than the
  excluded run, training is input-bound;
- `fit_input_excluded` (`--compare_fit`): the same model, optimizer, loss, batch and XLA setting,
  trained by Keras `model.fit`, in the same process;
- `input` (`--measure=input` or `all`): the input pipeline alone, images/s and images/s per CPU core.

Warm-up windows (tracing, autotuning) are excluded; each run reports the median of `--windows`
windows of `--window_steps` steps. FLOPs per image come from the built model (`flops.model_flops`,
training = 3x forward), so achieved TFLOP/s and MFU (with `--peak_tflops`, or the GPU table in
flops.py) are computed, not guessed. The result is saved as JSON (`--output`).
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from typing import Callable

from absl import app, flags

from convmixer_dist import config as cfg
from convmixer_dist import flags as cli  # Defines the training flags.
from convmixer_dist import rundir
from convmixer_dist.errors import UsageError, exit_on_usage_error, parse_flags

flags.DEFINE_enum("measure", "train", ["train", "input", "all"], "train: the training runs; input: "
                  "the input pipeline alone; all: both.")
flags.DEFINE_list("pipeline", ["excluded", "included"], "Training runs to make: excluded (one cached "
                  "batch per step), included (the real input pipeline), or both.")
flags.DEFINE_integer("warmup_windows", 1, "Untimed windows first (tracing, tf.data autotuning).")
flags.DEFINE_integer("windows", 5, "Timed windows per run; the median is reported.")
flags.DEFINE_integer("window_steps", 10, "Steps per window (a multiple of --steps_per_loop).")
flags.DEFINE_boolean("compare_fit", False, "Also train the same model with Keras model.fit on the same "
                     "cached batch and report custom/fit throughput.")
flags.DEFINE_list("variants", [], "Extra input-excluded runs of the custom loop, each with one setting "
                  "changed, reported as a ratio to the base run (same process, same data), e.g. "
                  "precision=mixed_bfloat16,precision=mixed_float16,xla=on. Settings: "
                  "precision, xla, steps_per_loop, sync_bn, augment_on_device.")
flags.DEFINE_integer("fit_steps_per_execution", 1, "model.fit's steps_per_execution (Keras default 1).")
flags.DEFINE_float("peak_tflops", 0.0, "Device peak TFLOP/s for MFU; 0 = from the GPU table (none on CPU).")
flags.DEFINE_string("output", "runs/benchmark.json", "Where to write the JSON result.")
flags.adopt_module_key_flags(cli)

FLAGS = flags.FLAGS
PIPELINES = ("excluded", "included")
# Settings a --variants run may change: they leave the model, the data and the strategy as they are.
# Their types, choices and bounds are those of the Config fields (config.py).
VARIANT_SETTINGS = ("precision", "xla", "steps_per_loop", "sync_bn", "augment_on_device")


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

    variants = []
    for item in items:
        name, _, text = item.partition("=")
        try:
            if name not in VARIANT_SETTINGS:
                raise ValueError(name)
            value = cfg.value_from_text(name, text)
            cfg.check_setting(name, value)
        except (ValueError, UsageError):
            raise UsageError(f"--variants: {item!r} is not one of {_variant_forms()}") from None
        variants.append((item, dataclasses.replace(config, **{name: value})))
    return variants


def median_rate(seconds: list[float], images_per_window: int) -> dict:
    """Per-window images/s and the median (and spread) of a run."""
    rates = [images_per_window / s for s in seconds]
    return {"window_seconds": seconds, "window_images_per_sec": rates,
            "images_per_sec": statistics.median(rates), "images_per_sec_min": min(rates),
            "images_per_sec_max": max(rates)}


def time_windows(run_window: Callable[[], None], warmup: int, windows: int, label: str) -> list[float]:
    """Wall seconds of `windows` calls of `run_window` after `warmup` untimed calls (with progress)."""
    for _ in range(warmup):
        run_window()
    seconds = []
    for i in range(windows):
        start = time.perf_counter()
        run_window()
        seconds.append(time.perf_counter() - start)
        print(f"  {label}: window {i + 1}/{windows} {seconds[-1]:.3f} s", flush=True)
    return seconds


def throughput_fields(rate: dict, global_batch: int, train_flops: int, peak: float | None) -> dict:
    """Step time, achieved TFLOP/s and MFU from a run's median images/s."""
    images_per_sec = rate["images_per_sec"]
    achieved = images_per_sec * train_flops / 1e12
    return {**rate, "step_time_ms": 1000 * global_batch / images_per_sec,
            "achieved_tflops": achieved, "mfu": achieved / peak if peak else None}


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


def _cached_dataset_fn(config, derived, arrays) -> Callable:
    """The real pipeline's first batch per input pipeline, cached and repeated (input excluded)."""
    from convmixer_dist import data

    real = data.make_dataset_fn(config, derived, "train", arrays)
    return lambda ctx: real(ctx).take(1).cache().repeat()


def _build(strategy, config, derived, policy: str):
    """Model and optimizer (slots built) in the strategy's scope under the precision `policy`."""
    import keras

    from convmixer_dist import optimization, train

    keras.mixed_precision.set_dtype_policy(policy)
    keras.utils.set_random_seed(config.seed)
    with strategy.scope():
        model = train.create_model(config)
        optimizer = optimization.create_optimizer(config, derived.total_steps, policy)
        # Keras 3 creates slots lazily, which fails inside a distributed tf.function: build them now.
        optimizer.build(model.trainable_variables)
    return model, optimizer


def _custom_runner(strategy, model, optimizer, config, derived, xla: bool, dataset) -> Callable:
    """A window of training steps through the project's own loop (forced to finish)."""
    import tensorflow as tf

    from convmixer_dist import train

    train_loop = train.make_train_loop(strategy, model, optimizer, config, derived, xla)
    iterator = iter(dataset)
    state = {"step": 0}
    calls = FLAGS.window_steps // config.steps_per_loop

    def run_window():
        for _ in range(calls):
            totals = train_loop(iterator, tf.constant(config.steps_per_loop, tf.int32),
                                tf.constant(state["step"], tf.int64), tf.constant(0, tf.int64))
            float(totals[0])  # As in training: the host reads the loss sums after every call.
            state["step"] += config.steps_per_loop
    return run_window


def _fit_runner(strategy, config, derived, arrays, policy: str, xla: bool) -> Callable:
    """A window of training steps through Keras `model.fit` with the same model, optimizer and data."""
    import keras
    import tensorflow as tf

    from convmixer_dist import optimization, train
    from convmixer_dist.config import derive

    with strategy.scope():
        model = train.create_model(config)
        optimizer = optimization.create_optimizer(config, derived.total_steps, policy)
        model.compile(optimizer=optimizer, jit_compile=xla, metrics=["accuracy"],
                      steps_per_execution=FLAGS.fit_steps_per_execution,
                      loss=keras.losses.CategoricalCrossentropy(from_logits=True,
                                                                label_smoothing=config.label_smoothing))
    # One global batch of the same pipeline, cached: fit splits it over the replicas itself.
    whole = derive(config, 1, derived.train_size, derived.eval_size)
    dataset = _cached_dataset_fn(config, whole, arrays)(tf.distribute.InputContext())
    dataset = dataset.map(lambda x, y: (x, y if y.dtype.is_floating else tf.one_hot(y, config.num_classes)))

    def run_window():
        model.fit(dataset, epochs=1, steps_per_epoch=FLAGS.window_steps, verbose=0)
    return run_window


def _input_rate(strategy, config, derived, arrays) -> dict:
    """Images/s of the real training input pipeline alone, and per CPU core this process may use."""
    from convmixer_dist import data

    iterator = iter(data.train_dataset(strategy, config, derived, arrays))
    batches = FLAGS.window_steps

    def run_window():
        for _ in range(batches):
            next(iterator)
    seconds = time_windows(run_window, FLAGS.warmup_windows, FLAGS.windows, "input pipeline")
    rate = median_rate(seconds, batches * config.global_batch_size)
    cores = len(os.sched_getaffinity(0))
    return {**rate, "cpu_cores": cores, "images_per_sec_per_core": rate["images_per_sec"] / cores,
            "augment": config.augment, "augment_on_device": config.augment_on_device}


def validate_benchmark_flags(config) -> list[tuple[str, object]]:
    """One-line errors for benchmark flags that cannot work together; returns the parsed --variants."""
    bad = [p for p in FLAGS.pipeline if p not in PIPELINES]
    if bad or not FLAGS.pipeline:
        raise UsageError(f"--pipeline={','.join(FLAGS.pipeline)}: expected excluded, included or both")
    for name in ("windows", "window_steps"):
        if getattr(FLAGS, name) < 1:
            raise UsageError(f"--{name}={getattr(FLAGS, name)}: expected a positive number")
    if FLAGS.window_steps % config.steps_per_loop:
        raise UsageError(f"--window_steps={FLAGS.window_steps} must be a multiple of "
                         f"--steps_per_loop={config.steps_per_loop}")
    if FLAGS.compare_fit and config.augment_on_device:
        raise UsageError("--compare_fit: model.fit cannot run --augment_on_device; drop one of them")
    variants = parse_variants(FLAGS.variants, config)
    for label, variant in variants:
        if FLAGS.window_steps % variant.steps_per_loop:
            raise UsageError(f"--variants={label}: --window_steps={FLAGS.window_steps} must be a "
                             f"multiple of its steps_per_loop")
    if FLAGS.variants and "excluded" not in FLAGS.pipeline:
        raise UsageError("--variants are compared with the input-excluded run: add excluded to --pipeline")
    if FLAGS.peak_tflops < 0:
        raise UsageError(f"--peak_tflops={FLAGS.peak_tflops}: expected >= 0")
    rundir.ensure_writable_file(FLAGS.output, f"--output={FLAGS.output}")
    return variants


def run_benchmark(config, variants: list[tuple[str, object]]) -> dict:
    """Every requested measurement for `config` (and its `variants`); returns the JSON-ready result."""
    import keras
    import tensorflow as tf

    from convmixer_dist import data, flops
    from convmixer_dist import strategy as strategy_lib
    from convmixer_dist import train
    from convmixer_dist.config import derive
    from convmixer_dist.model import count_params
    from convmixer_dist.precision import resolve_precision

    strategy = strategy_lib.create_strategy(config)  # Before any other op (multi_worker needs it).
    kind = strategy_lib.device_kind(strategy)
    policy = resolve_precision(config.precision, kind)
    xla = train.use_xla(config, kind)
    arrays = None if config.dataset == "synthetic" else data.load_arrays(config)
    derived = derive(config, strategy.num_replicas_in_sync, *data.trained_sizes(config, arrays))
    data.augment_spec(config).validate()

    device = _device_name(kind)
    peak = FLAGS.peak_tflops or (flops.peak_tflops(device, policy) if kind == "gpu" else None)
    model, optimizer = _build(strategy, config, derived, policy)
    forward = flops.model_flops(model)
    train_flops = flops.TRAINING_MULTIPLIER * forward
    result = {
        "model": {"name": config.model, "hidden_dim": config.hidden_dim, "depth": config.depth,
                  "kernel_size": config.kernel_size, "patch_size": config.patch_size,
                  "image_size": config.image_size, "num_classes": config.num_classes,
                  "parameters": count_params(model)},
        "setup": {"strategy": config.strategy, "replicas": derived.num_replicas, "device_kind": kind,
                  "device": device, "precision": policy, "xla": xla,
                  "global_batch_size": config.global_batch_size, "steps_per_loop": config.steps_per_loop,
                  "dataset": config.dataset, "augment": config.augment,
                  "augment_on_device": config.augment_on_device, "warmup_windows": FLAGS.warmup_windows,
                  "windows": FLAGS.windows, "window_steps": FLAGS.window_steps,
                  "cpu_cores": len(os.sched_getaffinity(0)), "tensorflow": tf.__version__,
                  "keras": keras.__version__, "python": platform.python_version(),
                  "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])},
        "flops_per_image_forward": forward, "flops_per_image_train": train_flops,
        "peak_tflops": peak, "runs": {},
    }
    images_per_window = FLAGS.window_steps * config.global_batch_size

    def record(name: str, run_window: Callable) -> None:
        seconds = time_windows(run_window, FLAGS.warmup_windows, FLAGS.windows, name)
        run = throughput_fields(median_rate(seconds, images_per_window), config.global_batch_size,
                                train_flops, peak)
        result["runs"][name] = run
        mfu = f", MFU {run['mfu']:.1%}" if run["mfu"] is not None else ""
        print(f"{name}: {run['images_per_sec']:,.1f} img/s (median of {FLAGS.windows}), step "
              f"{run['step_time_ms']:.1f} ms, {run['achieved_tflops']:.3f} TFLOP/s{mfu}", flush=True)

    if FLAGS.measure in ("train", "all"):
        for pipeline in FLAGS.pipeline:
            dataset = (strategy.distribute_datasets_from_function(_cached_dataset_fn(config, derived, arrays))
                       if pipeline == "excluded" else data.train_dataset(strategy, config, derived, arrays))
            record(f"custom_input_{pipeline}",
                   _custom_runner(strategy, model, optimizer, config, derived, xla, dataset))
        if FLAGS.compare_fit:
            record("fit_input_excluded", _fit_runner(strategy, config, derived, arrays, policy, xla))
        for label, variant in variants:
            v_policy, v_xla = resolve_precision(variant.precision, kind), train.use_xla(variant, kind)
            v_model, v_optimizer = _build(strategy, variant, derived, v_policy)
            dataset = strategy.distribute_datasets_from_function(_cached_dataset_fn(variant, derived, arrays))
            record(f"custom_input_excluded[{label}]",
                   _custom_runner(strategy, v_model, v_optimizer, variant, derived, v_xla, dataset))
            result["runs"][f"custom_input_excluded[{label}]"].update(precision=v_policy, xla=v_xla)
        keras.mixed_precision.set_dtype_policy(policy)
    if FLAGS.measure in ("input", "all"):
        result["input_pipeline"] = _input_rate(strategy, config, derived, arrays)
        rate = result["input_pipeline"]
        print(f"input pipeline: {rate['images_per_sec']:,.0f} img/s on {rate['cpu_cores']} core(s) = "
              f"{rate['images_per_sec_per_core']:,.0f} img/s/core", flush=True)

    runs = result["runs"]
    if "custom_input_excluded" in runs and FLAGS.variants:
        base = runs["custom_input_excluded"]["images_per_sec"]
        result["variant_over_base"] = {label: runs[f"custom_input_excluded[{label}]"]["images_per_sec"] / base
                                       for label in FLAGS.variants}
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
    rundir.write_json(FLAGS.output, result)
    print(f"Saved {FLAGS.output}", flush=True)
    return result


@exit_on_usage_error
def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments {argv[1:]}")
    config = cli.config_from_flags()
    variants = validate_benchmark_flags(config)
    from convmixer_dist.runtime import quiet_tensorflow_import

    quiet_tensorflow_import()
    run_benchmark(config, variants)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
