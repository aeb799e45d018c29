"""convmixer_dist: distributed ConvMixer training on tf.distribute (Trockman & Kolter, 2022)."""
