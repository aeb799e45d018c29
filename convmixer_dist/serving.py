"""Keras layers of the exported classifier (`commands/export.py`) that the training library defines,
so that a saved `.keras` file reloads wherever `convmixer_dist` is importable.

`EvalCenterCrop` is the evaluation transform of image-file runs (image_folder, tfrecord) as a layer:
the exported model then sees any image exactly as `evaluate` did (timm's crop_pct transform,
bicubic), instead of an approximation of it.
"""
from __future__ import annotations

import keras
import tensorflow as tf

from convmixer_dist.data import image_decode

PACKAGE = "convmixer_dist"


@keras.saving.register_keras_serializable(package=PACKAGE)
class EvalCenterCrop(keras.layers.Layer):
    """uint8 [N, H, W, 3] (any H, W) -> float32 [N, image_size, image_size, 3] on the 0..255 scale:
    `image_decode.center_crop(images, image_size, crop_fraction)`, the evaluation pipeline's own
    function (rounded to uint8 as there), so predictions match `evaluate` on the same images."""

    def __init__(self, image_size: int, crop_fraction: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.image_size = int(image_size)
        self.crop_fraction = float(crop_fraction)

    def call(self, images):
        images = tf.cast(images, tf.uint8)
        return tf.cast(image_decode.center_crop(images, self.image_size, self.crop_fraction), tf.float32)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.image_size, self.image_size, 3)

    def get_config(self):
        return {**super().get_config(), "image_size": self.image_size, "crop_fraction": self.crop_fraction}
