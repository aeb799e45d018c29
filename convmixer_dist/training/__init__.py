"""Training: the tf.function steps (`steps`), the checkpointed train state (`state`) and the driver (`loop`)."""
