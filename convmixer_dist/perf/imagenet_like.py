"""Generate ImageNet-like JPEGs for input benchmarks (never for training): an image-folder tree of
random-size images around 500x375, quality 90, with photo-like JPEG sizes.

    python -m convmixer_dist.perf.imagenet_like --output=/tmp/imagenet_bench --train_images=2000

OUTPUT/train/n0000000C/*.JPEG (20 classes) and OUTPUT/val/... (100 images). Each image is a smooth
random colour field plus mid-frequency and fine noise, so that entropy decoding costs about what it
costs on photographs (76 KB per image on average with the defaults; ImageNet's is about 110 KB).
A quarter are portrait. Seeded: the same command writes the same files.
"""
from __future__ import annotations

import os

from absl import flags

from convmixer_dist.errors import UsageError

CLASSES = 20
VAL_IMAGES = 100


def define_flags() -> None:
    """The generator's flags."""
    flags.DEFINE_string("output", None, "Directory for OUTPUT/train/<class>/*.JPEG and OUTPUT/val/.")
    flags.DEFINE_integer("train_images", 2000, "Training images (val: 100).", lower_bound=1)
    flags.DEFINE_integer("quality", 90, "JPEG quality.", lower_bound=1, upper_bound=100)
    flags.DEFINE_integer("seed", 0, "Seed of sizes and pixels.", lower_bound=0)


def photo_like(rng, height: int, width: int):
    """uint8 HxWx3: a smooth colour field plus mid-frequency and fine noise."""
    import numpy as np
    import tensorflow as tf

    def upsampled(values):
        return tf.image.resize(values[None].astype(np.float32), (height, width), method="bicubic")[0].numpy()

    smooth = upsampled(rng.uniform(0, 255, (height // 16 + 1, width // 16 + 1, 3)))
    middle = upsampled(rng.normal(0, 25, (height // 4 + 1, width // 4 + 1, 3)))
    fine = rng.normal(0, 6, (height, width, 3))
    return np.clip(smooth + middle + fine, 0, 255).astype(np.uint8)


def generate(output: str, train_images: int, quality: int = 90, seed: int = 0) -> list[int]:
    """Write the tree; returns the JPEG sizes in bytes."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    sizes = []
    for split, count in (("train", train_images), ("val", VAL_IMAGES)):
        for i in range(count):
            folder = os.path.join(output, split, f"n{i % CLASSES:08d}")
            os.makedirs(folder, exist_ok=True)
            width, height = int(rng.normal(500, 60)), int(rng.normal(375, 45))
            if rng.uniform() < 0.25:
                width, height = height, width
            data = tf.io.encode_jpeg(photo_like(rng, height, width), quality=quality).numpy()
            with open(os.path.join(folder, f"{split}_{i:06d}.JPEG"), "wb") as f:
                f.write(data)
            sizes.append(len(data))
    return sizes


def main(args: list[str], opts) -> None:
    if args:
        raise UsageError(f"unexpected arguments {args}; usage: --output=DIR [--train_images=N]")
    if not opts.output:
        raise UsageError("--output is required: the directory to write the images to")
    from convmixer_dist import rundir
    from convmixer_dist.runtime import quiet_tensorflow_import

    rundir.ensure_writable_dir(opts.output, f"--output={opts.output}")
    quiet_tensorflow_import()
    sizes = generate(opts.output, opts.train_images, opts.quality, opts.seed)
    print(f"wrote {len(sizes)} JPEGs to {opts.output}, {sum(sizes) / len(sizes) / 1000:.0f} KB on average")


if __name__ == "__main__":
    from convmixer_dist import flags as cli

    cli.run_command(main, define_flags)
