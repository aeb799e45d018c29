"""Evaluate a training run's checkpoint on its test split: top-1, top-5, loss, per-class accuracy and
the confusion matrix, printed and saved in the model directory.

    python -m convmixer_dist.commands.evaluate --model_dir=runs/cifar10 [--checkpoint=runs/cifar10/checkpoints/ckpt-500]

The run is rebuilt from MODEL_DIR/flags.txt (model and dataset exactly as trained, see `saved_run`);
without --checkpoint the latest one is used. Training flags given on the command line override the
run's (e.g. `--data_dir=/new/place` if the data moved, `--global_batch_size=1000` for the eval batch).
The data are the run's evaluation split read by the training input pipeline (`data.make_dataset_fn`),
so preprocessing is identical and every example counts once. Writes MODEL_DIR/eval_report.json and
MODEL_DIR/confusion_matrix.png.
"""
from __future__ import annotations

import math
import os
import sys
import time
import types
from typing import TextIO

import numpy as np
from absl import flags

from convmixer_dist import flags as cli
from convmixer_dist.commands import saved_run
from convmixer_dist.config import Config
from convmixer_dist.errors import UsageError

REPORT_FILE = "eval_report.json"
CONFUSION_FILE = "confusion_matrix.png"
PRINT_MATRIX_MAX_CLASSES = 20


def compute_metrics(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """Loss (mean cross-entropy from logits), top-1, top-k (k = min(5, classes)), per-class accuracy
    and the confusion matrix (rows: true class, columns: predicted)."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    n = len(labels)
    loss = float(-log_probs[np.arange(n), labels].mean()) if n else float("nan")
    predicted = logits.argmax(axis=1)
    k = min(5, num_classes)
    # Rank of the true class = number of classes with a strictly larger logit (ties favour the truth,
    # as tf.math.in_top_k does).
    true_logit = logits[np.arange(n), labels][:, None]
    in_top_k = (logits > true_logit).sum(axis=1) < k
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    counts = confusion.sum(axis=1)
    per_class = np.divide(np.diag(confusion), counts, out=np.full(num_classes, np.nan), where=counts > 0)
    return {"examples": int(n), "loss": loss, "top1_accuracy": float((predicted == labels).mean()),
            "top_k": k, "top5_accuracy": float(in_top_k.mean()), "per_class_accuracy": per_class,
            "class_counts": counts, "confusion_matrix": confusion}


def predict_split(config: Config, model, out: TextIO = sys.stdout) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) over the run's evaluation split, with progress lines on `out`."""
    import tensorflow as tf

    from convmixer_dist.data import pipeline as data
    from convmixer_dist.config import derive

    loaded = data.load(config)
    derived = derive(config, 1, *data.split_sizes(config, loaded))
    dataset = data.make_dataset_fn(config, derived, "test", loaded)(tf.distribute.InputContext())
    batches = math.ceil(derived.eval_size / derived.per_replica_batch_size)
    predict = tf.function(lambda images: model(images, training=False), reduce_retracing=True)
    every = max(1, batches // 10)
    all_logits, all_labels, seen, start = [], [], 0, time.time()
    print(f"evaluating {derived.eval_size} examples of --dataset={config.dataset} in {batches} batches",
          file=out, flush=True)
    for i, (images, labels) in enumerate(dataset, 1):
        all_logits.append(predict(images).numpy())
        all_labels.append(labels.numpy())
        seen += len(all_labels[-1])
        if i % every == 0 or i == batches:
            rate = seen / max(time.time() - start, 1e-9)
            print(f"  batch {i}/{batches}: {seen}/{derived.eval_size} examples ({rate:,.0f} img/s)",
                  file=out, flush=True)
    return np.concatenate(all_logits), np.concatenate(all_labels).astype(np.int64)


def format_report(metrics: dict, names: list[str]) -> str:
    """Human-readable summary, per-class table and (for few classes) the confusion matrix."""
    lines = [f"top-1 accuracy {metrics['top1_accuracy']:.4f}   top-{metrics['top_k']} accuracy "
             f"{metrics['top5_accuracy']:.4f}   loss {metrics['loss']:.4f}   ({metrics['examples']} examples)",
             "", f"{'class':<24} {'examples':>8} {'accuracy':>8}"]
    for name, count, acc in zip(names, metrics["class_counts"], metrics["per_class_accuracy"]):
        lines.append(f"{name[:24]:<24} {count:>8d} {'-' if np.isnan(acc) else f'{acc:.4f}':>8}")
    confusion = metrics["confusion_matrix"]
    if len(names) <= PRINT_MATRIX_MAX_CLASSES:
        width = max(5, len(str(confusion.max())) + 1)
        lines += ["", "confusion matrix (rows: true class, columns: predicted)",
                  " " * 13 + "".join(f"{i:>{width}d}" for i in range(len(names)))]
        for i, row in enumerate(confusion):
            lines.append(f"{i:>3d} {names[i][:9]:<9}" + "".join(f"{v:>{width}d}" for v in row))
    else:
        lines += ["", f"confusion matrix: {len(names)} classes, see {CONFUSION_FILE} / {REPORT_FILE}"]
    return "\n".join(lines)


def plot_confusion(confusion: np.ndarray, names: list[str], path: str, title: str) -> str:
    """Row-normalized confusion matrix as a PNG (counts printed for up to 20 classes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    rows = confusion.sum(axis=1, keepdims=True)
    fractions = np.divide(confusion, rows, out=np.zeros(confusion.shape), where=rows > 0)
    size = min(4 + 0.45 * n, 24)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true class")
    if n <= 30:
        ax.set_xticks(range(n), names, rotation=90, fontsize=8)
        ax.set_yticks(range(n), names, fontsize=8)
    if n <= PRINT_MATRIX_MAX_CLASSES:
        for i in range(n):
            for j in range(n):
                if confusion[i, j]:
                    ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if fractions[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.tight_layout()
    from convmixer_dist import rundir

    with rundir.atomic_output(path) as tmp:  # never half a PNG (a full disk, a kill)
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def evaluate_run(config: Config, checkpoint: str | None = None, out: TextIO = sys.stdout) -> dict:
    """Restore the checkpoint, evaluate the split, print the report, write JSON and PNG; returns the
    JSON payload."""
    from convmixer_dist import rundir

    report_path = os.path.join(config.model_dir, REPORT_FILE)
    for output in (report_path, os.path.join(config.model_dir, CONFUSION_FILE)):
        rundir.ensure_writable_file(output, f"--model_dir={config.model_dir}")  # before the work
    model, step, path = saved_run.restore_checkpoint(config, checkpoint)  # Falls back as training does.
    names = saved_run.class_names(config, config.model_dir)
    print(f"checkpoint {path} (step {step})", file=out, flush=True)
    logits, labels = predict_split(config, model, out)
    metrics = compute_metrics(logits, labels, config.num_classes)
    print(format_report(metrics, names), file=out, flush=True)
    report = {
        "checkpoint": path, "step": step, "dataset": config.dataset, "model": config.model,
        "examples": metrics["examples"], "loss": metrics["loss"],
        "top1_accuracy": metrics["top1_accuracy"], "top5_accuracy": metrics["top5_accuracy"],
        "top_k": metrics["top_k"], "class_names": names,
        "per_class": [{"class": name, "examples": int(count),
                       "accuracy": None if np.isnan(acc) else float(acc)}
                      for name, count, acc in zip(names, metrics["class_counts"],
                                                  metrics["per_class_accuracy"])],
        "confusion_matrix": metrics["confusion_matrix"].tolist(),
    }
    rundir.write_json(report_path, report)
    png = plot_confusion(metrics["confusion_matrix"], names, os.path.join(config.model_dir, CONFUSION_FILE),
                         f"{config.model} on {config.dataset}: top-1 {metrics['top1_accuracy']:.4f}")
    print(f"wrote {report_path} and {png}", file=out, flush=True)
    return report


# ---------------------------------------------------------------------------------------- command
def define_flags() -> None:
    """--checkpoint; the training flags (--model_dir, --data_dir, ...) override the run's."""
    flags.DEFINE_string("checkpoint", None, "Checkpoint prefix (MODEL_DIR/checkpoints/ckpt-N); "
                        "default: the latest.")
    for name in ("model_dir", "data_dir", "global_batch_size"):
        flags.declare_key_flag(name)


def main(args: list[str], opts: types.SimpleNamespace) -> None:
    if args:
        raise UsageError(f"unexpected arguments {args}; usage: --model_dir=DIR [--checkpoint=PREFIX]")
    overrides = dict(opts.overrides)
    if "model_dir" not in overrides:
        raise UsageError("--model_dir is required: the directory of the training run to evaluate")
    config = saved_run.load_run_config(overrides.pop("model_dir"), overrides)
    from convmixer_dist.runtime import quiet_tensorflow_import

    quiet_tensorflow_import()
    evaluate_run(config, opts.checkpoint)


if __name__ == "__main__":
    cli.run_command(main, define_flags, training=True)
