"""Training: the tf.function steps (`steps`), the checkpointed train state (`state`), the driver
(`loop`) with its set-up (`setup`, `inputs`) and what it reports (`report`)."""
