"""Augmentation throughput (images/s) in both placements, for sizing the input pipeline.

    taskset -c 0 python -m convmixer_dist.perf.augment_benchmark --randaug_n=2 --randaug_m=12   # 1 core
    python -m convmixer_dist.perf.augment_benchmark --placement=on_device --image_size=224 --batch_size=64 \
        --augment=rrc --crop_scale=0.08 --randaug_n=2 --randaug_m=9

The augmentation is the one training would apply with the same training flags (--augment,
--crop_scale, --randaug_n, --randaug_m, --jitter, --erase_prob, --mixup_alpha, --cutmix_alpha,
--image_size, --seed: the definitions and defaults of `convmixer_dist.main`); `--hflip` adds the
horizontal flip that --augment=rrc implies.

`tf_data`: a repeated in-memory dataset, batched, augmented with `BatchAugmenter.map_dataset`
(parallel map, prefetch) and iterated. `on_device`: one `tf.function` applying the augmenter to a
batch already in memory (what the train step does under `strategy.run`, minus the model). Only the
augmentation is timed; images are random structured images of the given size.
"""
from __future__ import annotations

import dataclasses
import os
import types

from absl import flags

from convmixer_dist import flags as cli
from convmixer_dist import rundir
from convmixer_dist.errors import UsageError
from convmixer_dist.perf.timing import time_calls

TRAINING_FLAGS = ("augment", "crop_scale", "randaug_n", "randaug_m", "jitter", "erase_prob",
                  "mixup_alpha", "cutmix_alpha", "image_size", "seed")


def define_flags() -> None:
    """The benchmark's own flags; `--help` also lists the training flags it reads."""
    flags.DEFINE_enum("placement", "both", ["tf_data", "on_device", "both"], "What to time.")
    cli.define_number("batch_size", 256, 1, 65536, "Images per augmented batch.")
    cli.define_number("batches", 40, 1, 10 ** 6, "Timed batches (after 5 warm-up batches).")
    flags.DEFINE_bool("hflip", False, "Also flip horizontally (as --augment=rrc does).")
    flags.DEFINE_string("output", "runs/augment_benchmark.json", "Where to write the JSON result.")
    for name in TRAINING_FLAGS:
        flags.declare_key_flag(name)


def benchmark(spec, placement: str, batch_size: int, image_size: int, batches: int) -> float:
    """Images per second for `spec` in `placement` ('tf_data' or 'on_device')."""
    import numpy as np
    import tensorflow as tf

    from convmixer_dist.data.augment import BatchAugmenter

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, batch_size).astype("int32")
    augmenter = BatchAugmenter(spec, 10, image_size)
    if placement == "tf_data":
        dataset = (tf.data.Dataset.from_tensors((images, labels)).repeat()
                   .map(lambda x, y: (tf.cast(x, tf.float32), y)))
        iterator = iter(augmenter.map_dataset(dataset).prefetch(2))
        seconds = sum(time_calls(lambda: next(iterator), 5, batches))
    else:
        step_fn = tf.function(lambda x, y, s: augmenter(x, y, step=s))
        x, y = tf.cast(tf.constant(images), tf.float32), tf.constant(labels)
        counter = iter(range(10**9))
        seconds = sum(time_calls(lambda: step_fn(x, y, tf.constant(next(counter), tf.int64))[0].numpy(),
                                  5, batches))
    return batches * batch_size / seconds


def main(args: list[str], f: types.SimpleNamespace) -> None:
    if args:
        raise UsageError(f"unexpected arguments {args}")
    config = cli.config_from_flags()
    rundir.ensure_writable_file(f.output, f"--output={f.output}")
    from convmixer_dist.runtime import quiet_tensorflow_import

    quiet_tensorflow_import()  # augment imports TensorFlow; its import-time logs would precede errors.
    from convmixer_dist.data.pipeline import augment_spec

    spec = augment_spec(config)
    spec = dataclasses.replace(spec, hflip=spec.hflip or f.hflip).validate()
    if spec.is_identity:
        raise UsageError("nothing to time: set an augmentation (e.g. --randaug_n=2 --randaug_m=12, "
                         "--augment=rrc --crop_scale=0.35, --jitter, --erase_prob, --mixup_alpha, --hflip)")
    cores = len(os.sched_getaffinity(0))
    placements = ["tf_data", "on_device"] if f.placement == "both" else [f.placement]
    results = {"spec": dataclasses.asdict(spec), "batch_size": f.batch_size,
               "image_size": config.image_size,
               "batches": f.batches, "cpu_cores": cores, "placements": {}}
    for placement in placements:
        rate = benchmark(spec, placement, f.batch_size, config.image_size, f.batches)
        results["placements"][placement] = {"images_per_sec": rate, "images_per_sec_per_core": rate / cores}
        print(f"{placement:9s} {rate:9.0f} images/s on {cores} core(s) = {rate / cores:8.0f} images/s/core "
              f"(batch {f.batch_size}, {config.image_size}x{config.image_size}, {spec})", flush=True)
    rundir.write_json(f.output, results)
    print(f"Saved {f.output}", flush=True)


if __name__ == "__main__":
    cli.run_command(main, define_flags, training=True)
