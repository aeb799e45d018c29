"""Augmentation throughput (images/s) in both placements, for sizing the input pipeline.

    taskset -c 0 python -m convmixer_dist.augment_benchmark --randaug_n=2 --randaug_m=12   # 1 core
    python -m convmixer_dist.augment_benchmark --placement=on_device --image_size=224 --batch_size=64

`tf_data`: a repeated in-memory dataset, batched, augmented with `BatchAugmenter.map_dataset`
(parallel map, prefetch) and iterated. `on_device`: one `tf.function` applying the augmenter to a
batch already in memory (what the train step does under `strategy.run`, minus the model). Only the
augmentation is timed; images are random structured images of the given size.
"""
from __future__ import annotations

import dataclasses
import os
import time

from absl import app, flags

from convmixer_dist import rundir
from convmixer_dist.errors import UsageError, exit_on_usage_error, parse_flags


def _define_flags() -> None:
    flags.DEFINE_enum("placement", "both", ["tf_data", "on_device", "both"], "What to time.")
    flags.DEFINE_integer("batch_size", 256, "Images per augmented batch.")
    flags.DEFINE_integer("image_size", 32, "Square image side in pixels.")
    flags.DEFINE_integer("batches", 40, "Timed batches (after 5 warm-up batches).")
    flags.DEFINE_float("crop_scale", 1.0, "AugmentSpec.crop_scale.")
    flags.DEFINE_integer("randaug_n", 2, "AugmentSpec.randaug_n.")
    flags.DEFINE_float("randaug_m", 12, "AugmentSpec.randaug_m.")
    flags.DEFINE_float("jitter", 0.0, "AugmentSpec.jitter.")
    flags.DEFINE_float("erase_prob", 0.0, "AugmentSpec.erase_prob.")
    flags.DEFINE_float("mixup_alpha", 0.0, "AugmentSpec.mixup_alpha.")
    flags.DEFINE_float("cutmix_alpha", 0.0, "AugmentSpec.cutmix_alpha.")
    flags.DEFINE_bool("hflip", False, "AugmentSpec.hflip.")
    flags.DEFINE_string("output", "runs/augment_benchmark.json", "Where to write the JSON result.")


def _time(run_batch, batches: int) -> float:
    for _ in range(5):
        run_batch()
    start = time.perf_counter()
    for _ in range(batches):
        run_batch()
    return time.perf_counter() - start


def benchmark(spec, placement: str, batch_size: int, image_size: int, batches: int) -> float:
    """Images per second for `spec` in `placement` ('tf_data' or 'on_device')."""
    import numpy as np
    import tensorflow as tf

    from convmixer_dist.augment import BatchAugmenter

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, batch_size).astype("int32")
    augmenter = BatchAugmenter(spec, 10, image_size)
    if placement == "tf_data":
        dataset = (tf.data.Dataset.from_tensors((images, labels)).repeat()
                   .map(lambda x, y: (tf.cast(x, tf.float32), y)))
        iterator = iter(augmenter.map_dataset(dataset).prefetch(2))
        seconds = _time(lambda: next(iterator), batches)
    else:
        step_fn = tf.function(lambda x, y, s: augmenter(x, y, step=s))
        x, y = tf.cast(tf.constant(images), tf.float32), tf.constant(labels)
        counter = iter(range(10**9))
        seconds = _time(lambda: step_fn(x, y, tf.constant(next(counter), tf.int64))[0].numpy(), batches)
    return batches * batch_size / seconds


@exit_on_usage_error
def main(argv) -> None:
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    rundir.ensure_writable_file(f.output, f"--output={f.output}")
    from convmixer_dist.runtime import quiet_tensorflow_import

    quiet_tensorflow_import()  # augment imports TensorFlow; its import-time logs would precede errors.
    from convmixer_dist.augment import AugmentSpec

    spec = AugmentSpec(crop_scale=f.crop_scale, randaug_n=f.randaug_n, randaug_m=f.randaug_m,
                       jitter=f.jitter, erase_prob=f.erase_prob, mixup_alpha=f.mixup_alpha,
                       cutmix_alpha=f.cutmix_alpha, hflip=f.hflip).validate()
    cores = len(os.sched_getaffinity(0))
    placements = ["tf_data", "on_device"] if f.placement == "both" else [f.placement]
    results = {"spec": dataclasses.asdict(spec), "batch_size": f.batch_size, "image_size": f.image_size,
               "batches": f.batches, "cpu_cores": cores, "placements": {}}
    for placement in placements:
        rate = benchmark(spec, placement, f.batch_size, f.image_size, f.batches)
        results["placements"][placement] = {"images_per_sec": rate, "images_per_sec_per_core": rate / cores}
        print(f"{placement:9s} {rate:9.0f} images/s on {cores} core(s) = {rate / cores:8.0f} images/s/core "
              f"(batch {f.batch_size}, {f.image_size}x{f.image_size}, {spec})", flush=True)
    rundir.write_json(f.output, results)
    print(f"Saved {f.output}", flush=True)

if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _define_flags()
    app.run(main, flags_parser=parse_flags)
