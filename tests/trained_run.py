"""One tiny training run made by the real `python -m convmixer_dist.main` (2 mirrored CPU replicas,
synthetic data), shared by the evaluate/export/predict tests of a pytest session."""
from __future__ import annotations

import json
import os

from helpers import run_cli

NUM_CLASSES = 4
EVAL_SIZE = 100
TRAIN_STEPS = 40
FLAGS = ["--strategy=mirrored", "--cpu_replicas=2", "--dataset=synthetic", f"--num_classes={NUM_CLASSES}",
         "--synthetic_train_size=640", f"--synthetic_test_size={EVAL_SIZE}", "--hidden_dim=32", "--depth=2",
         "--kernel_size=3", "--patch_size=4", "--image_size=16", "--global_batch_size=32",
         f"--train_steps={TRAIN_STEPS}", "--steps_per_loop=8", "--learning_rate=0.02", "--seed=1",
         # Synchronized BatchNorm keeps the replicas' moving statistics identical. Without it each
         # replica updates its own copy (Keras 3 BN under MirroredStrategy), the checkpoint keeps
         # replica 0's, and the run's own evaluation (averaged over replicas) is not reproducible.
         "--sync_bn"]

_RUN: dict = {}


def trained_run(tmp_path_factory) -> tuple[str, dict]:
    """(model_dir, summary.json) of the shared run, training it on first use."""
    if not _RUN:
        model_dir = str(tmp_path_factory.mktemp("trained") / "run")
        result = run_cli("convmixer_dist.main", *FLAGS, f"--model_dir={model_dir}")
        assert result.returncode == 0, result.stderr[-2000:]
        with open(os.path.join(model_dir, "summary.json")) as f:
            _RUN.update(model_dir=model_dir, summary=json.load(f))
    return _RUN["model_dir"], _RUN["summary"]
