"""Training curves from a model directory's TensorBoard event files, as one PNG.

    python -m convmixer_dist.commands.plot --model_dir=runs/cifar10 [--output=curves.png]

Every directory under --model_dir that holds `events.out.tfevents.*` files is a run, named by its
path relative to --model_dir (`train`, `validation`, `test`, ...); `eval/`, where runs written before
the test split's run was named `test` keep it, is read as part of `test`. All scalar tags are read, whether written by
TF2 `tf.summary.scalar` (a tensor) or as a TF1 `simple_value`; each tag gets one panel with a curve
per run, `loss`, `accuracy` and `learning_rate` first. Several event files in one run (a resumed
job) are merged; for a step logged twice the later write wins. The PNG goes to
`<model_dir>/training_curves.png` unless --output says otherwise.
"""
from __future__ import annotations

import math
import os
import sys
import types
from typing import Dict, List, Tuple

from absl import flags

from convmixer_dist import flags as cli
from convmixer_dist.errors import UsageError

EVENT_FILE_MARKER = "events.out.tfevents."
DEFAULT_OUTPUT = "training_curves.png"
FIRST_TAGS = ("loss", "accuracy", "top5_accuracy", "learning_rate")
OLD_RUN_NAMES = {"eval": "test"}  # Older runs wrote the test split's events under eval/.

# {run: {tag: [(step, value), ...] sorted by step}}
Scalars = Dict[str, Dict[str, List[Tuple[int, float]]]]


def find_event_files(model_dir: str) -> dict[str, list[str]]:
    """{run name: [event files]} for every directory under model_dir holding event files."""
    if "://" in model_dir:  # gs://, hdfs://, ...: TensorFlow's file system layer
        import tensorflow as tf
        walk = tf.io.gfile.walk
    else:  # Local: no TensorFlow import, so a wrong directory fails in a fraction of a second.
        walk = os.walk
    runs: dict[str, list[str]] = {}
    for directory, _, files in walk(model_dir):
        events = sorted(os.path.join(directory, f) for f in files if EVENT_FILE_MARKER in f)
        if events:
            rel = os.path.relpath(directory, model_dir)
            name = os.path.basename(os.path.normpath(model_dir)) if rel == "." else rel
            runs.setdefault(OLD_RUN_NAMES.get(name, name), []).extend(events)
    return runs


def _scalar_value(value) -> float | None:
    """A summary value's scalar: TF1 simple_value, or a rank-0 numeric TF2 tensor; else None."""
    import tensorflow as tf

    kind = value.WhichOneof("value")
    if kind == "simple_value":
        return float(value.simple_value)
    if kind == "tensor":
        plugin = value.metadata.plugin_data.plugin_name
        if plugin not in ("", "scalars") or value.tensor.tensor_shape.dim:
            return None
        array = tf.make_ndarray(value.tensor)
        if array.dtype.kind in "fiub":
            return float(array)
    return None


def read_scalars(model_dir: str) -> Scalars:
    """All scalar series under model_dir. UsageError if there are no event files / no scalars."""
    if "://" not in model_dir and not os.path.isdir(model_dir):
        raise UsageError(f"--model_dir={model_dir}: directory does not exist")
    runs = find_event_files(model_dir)
    if not runs:
        raise UsageError(f"--model_dir={model_dir}: no TensorBoard event files "
                         f"({EVENT_FILE_MARKER}*) under it; train first or point at the run's directory")
    from convmixer_dist.runtime import quiet_tensorflow_import

    quiet_tensorflow_import()  # No TensorFlow start-up chatter in a plotting command.
    import tensorflow as tf

    scalars: Scalars = {}
    for run, files in sorted(runs.items()):
        points: dict[str, dict[int, tuple[float, float]]] = {}
        for path in files:
            try:
                for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
                    event = tf.compat.v1.Event.FromString(record)
                    for value in event.summary.value:
                        scalar = _scalar_value(value)
                        if scalar is None:
                            continue
                        series = points.setdefault(value.tag, {})
                        old = series.get(event.step)
                        if old is None or event.wall_time >= old[0]:
                            series[event.step] = (event.wall_time, scalar)
            except tf.errors.DataLossError:  # A run still being written ends mid-record: keep the rest.
                print(f"warning: {path} ends with a truncated record; plotted what was readable",
                      file=sys.stderr)
        if points:
            scalars[run] = {tag: sorted((step, v) for step, (_, v) in series.items())
                            for tag, series in points.items()}
    if not scalars:
        raise UsageError(f"--model_dir={model_dir}: event files found but no scalar summaries in them")
    return scalars


def _tag_order(tags) -> list[str]:
    first = [t for t in FIRST_TAGS if t in tags]
    return first + sorted(t for t in tags if t not in first)


def plot_scalars(scalars: Scalars, output: str, title: str = "") -> str:
    """One panel per tag (curves per run, x = step); writes a PNG to `output` and returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tags = _tag_order({tag for series in scalars.values() for tag in series})
    columns = min(3, len(tags))
    rows = math.ceil(len(tags) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False)
    colors = {run: f"C{i}" for i, run in enumerate(sorted(scalars))}  # one colour per run everywhere
    for ax, tag in zip(axes.flat, tags):
        for run, series in sorted(scalars.items()):
            if tag in series:
                steps, values = zip(*series[tag])
                ax.plot(steps, values, label=run, color=colors[run],
                        marker="o" if len(steps) < 30 else None, markersize=3)
        ax.set_title(tag)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if tag == "learning_rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(tags):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(output))
    os.makedirs(directory, exist_ok=True)
    from convmixer_dist import rundir

    with rundir.atomic_output(output) as tmp:  # never half a PNG (a full disk, a kill)
        fig.savefig(tmp, dpi=100, format="png")  # exactly `output` (no ".png" appended)
    plt.close(fig)
    return output


def plot_model_dir(model_dir: str, output: str | None = None) -> str:
    """Read model_dir's scalars and write the PNG (default model_dir/training_curves.png; an
    existing directory as `output` receives training_curves.png). The output is checked writable
    before the event files are read."""
    from convmixer_dist import rundir

    output = output or os.path.join(model_dir, DEFAULT_OUTPUT)
    if os.path.isdir(output):
        output = os.path.join(output, DEFAULT_OUTPUT)
    if "://" not in output:
        rundir.ensure_writable_file(output, f"--output={output}")
    scalars = read_scalars(model_dir)
    return plot_scalars(scalars, output, title=os.path.basename(os.path.normpath(model_dir)))


def define_flags() -> None:
    flags.DEFINE_string("model_dir", None, "Model directory whose TensorBoard event files to plot.")
    flags.DEFINE_string("output", None, f"PNG to write (default: <model_dir>/{DEFAULT_OUTPUT}).")


def main(args: list[str], opts: types.SimpleNamespace) -> None:
    if args:
        raise UsageError(f"unexpected arguments {args}; usage: --model_dir=DIR [--output=PNG]")
    if not opts.model_dir:
        raise UsageError("--model_dir is required: the model directory whose event files to plot")
    path = plot_model_dir(opts.model_dir, opts.output)
    print(f"wrote {path}")


if __name__ == "__main__":
    cli.run_command(main, define_flags)
