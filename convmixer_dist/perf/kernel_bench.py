"""Micro-benchmark of ConvMixer's hot spot: the depthwise convolution ('same' padding, stride 1).

    python -m convmixer_dist.perf.kernel_bench                  # full default grid on the default device
    python -m convmixer_dist.perf.kernel_bench --kernel_sizes=9 --hidden_dims=768 --dtypes=float32 \\
        --data_formats=NHWC --xla=off,on --output_dir=/tmp/kb --profile
    tensorboard --logdir /tmp/kb                           # Profile tab, one step per grid point

Each grid point (kernel size x hidden dim x batch x spatial side x dtype x data format x XLA x pass)
runs `tf.nn.depthwise_conv2d` (what keras DepthwiseConv2D calls) as one `tf.function` with fixed
shapes: `forward` computes y; `forward_backward` computes y plus dL/dx and dL/dkernel for a given dy.
Per point it reports the median and min per-iteration time, the analytic FLOPs and minimum bytes moved,
and the achieved GFLOP/s and GB/s. A point the device cannot run (e.g. NCHW float16 depthwise on CPU)
becomes a row with status "unsupported: <reason>" (a point that runs out of memory: "out of memory:
<reason>") instead of stopping the run. Results go to
OUTPUT_DIR/kernel_bench.{csv,json}, rewritten atomically after every point. With --profile a second
pass runs one more iteration of each measured point under the profiler (kept out of the timed pass so
tracing does not inflate the times); TensorBoard step i is row i of the CSV.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import os
import statistics
import types

from absl import flags

from convmixer_dist import flags as cli
from convmixer_dist import rundir
from convmixer_dist.errors import UsageError
from convmixer_dist.perf.timing import time_calls

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CHOICES = {"dtypes": tuple(DTYPE_BYTES), "data_formats": ("NHWC", "NCHW"), "xla": ("off", "on"),
           "passes": ("forward", "forward_backward")}
FIELDS = ["kernel_size", "hidden_dim", "batch_size", "spatial", "dtype", "data_format", "xla", "pass",
          "status", "time_ms", "min_ms", "flops", "bytes", "gflops", "gb_s"]


def define_flags() -> None:
    flags.DEFINE_string("kernel_sizes", "3,5,7,9", "Depthwise kernel sizes (1..31).")
    flags.DEFINE_string("hidden_dims", "256,768", "Channels C (ConvMixer hidden dim).")
    flags.DEFINE_string("batch_sizes", "64", "Batch sizes N.")
    flags.DEFINE_string("spatial", "16", "Feature-map side H=W (image size / patch size).")
    flags.DEFINE_string("dtypes", "float32,bfloat16,float16", "Any of float32, bfloat16, float16.")
    flags.DEFINE_string("data_formats", "NHWC,NCHW", "Any of NHWC, NCHW.")
    flags.DEFINE_string("xla", "off,on", "Any of off, on (tf.function jit_compile).")
    flags.DEFINE_string("passes", "forward,forward_backward", "Any of forward, forward_backward.")
    cli.define_number("warmup", 3, 0, 10 ** 4, "Untimed iterations per point (the first one compiles).")
    cli.define_number("iters", 10, 1, 10 ** 6, "Timed iterations per point.")
    flags.DEFINE_string("output_dir", "runs/kernel_bench", "Where kernel_bench.csv/.json (and profiles) go.")
    flags.DEFINE_bool("profile", False, "Also capture a TensorBoard profile, one step per grid point.")
    flags.DEFINE_string("device", "", 'TF device; default "/GPU:0" if a GPU exists else "/CPU:0".')


@dataclasses.dataclass(frozen=True)
class Point:
    """One benchmark configuration; field names match the CSV columns."""
    kernel_size: int
    hidden_dim: int
    batch_size: int
    spatial: int
    dtype: str
    data_format: str
    xla: str
    pass_: str


def parse_int_list(flag: str, text: str, low: int = 1, high: int = 1 << 20) -> list[int]:
    """"3,5" -> [3, 5]; any item not an integer in [low, high] is a UsageError naming --flag."""
    try:
        values = [int(item) for item in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(low <= v <= high for v in values):
        raise UsageError(f"--{flag}={text!r}: expected comma-separated integers in {low}..{high}")
    return values


def parse_choice_list(flag: str, text: str, allowed: tuple[str, ...]) -> list[str]:
    """"NHWC,NCHW" -> ["NHWC", "NCHW"]; any item outside `allowed` is a UsageError naming --flag."""
    values = text.split(",")
    if not all(v in allowed for v in values):
        raise UsageError(f"--{flag}={text!r}: expected a comma-separated subset of {','.join(allowed)}")
    return values


def grid(kernel_sizes, hidden_dims, batch_sizes, spatial, dtypes, data_formats, xla, passes
         ) -> list[Point]:
    """The cartesian product, in flag order (kernel size outermost, pass innermost)."""
    return [Point(*combo) for combo in itertools.product(
        kernel_sizes, hidden_dims, batch_sizes, spatial, dtypes, data_formats, xla, passes)]


def depthwise_flops(point: Point) -> int:
    """Forward: one multiply-add (2 FLOPs) per output element per kernel tap: 2*N*H*W*C*k*k.
    Forward+backward: 3x forward (forward, input gradient and kernel gradient cost the same)."""
    forward = 2 * point.batch_size * point.spatial ** 2 * point.hidden_dim * point.kernel_size ** 2
    return forward * (3 if point.pass_ == "forward_backward" else 1)


def depthwise_bytes(point: Point) -> int:
    """Minimum DRAM traffic, each tensor touched once (caches ignored), activations A = N*H*W*C and
    kernel K = k*k*C elements. Forward: read x, read kernel, write y = 2A + K. Forward+backward adds
    read dy, read x, write dx (3A) and read kernel, write dkernel (2K): 5A + 3K in total."""
    acts = point.batch_size * point.spatial ** 2 * point.hidden_dim
    kernel = point.kernel_size ** 2 * point.hidden_dim
    elements = 5 * acts + 3 * kernel if point.pass_ == "forward_backward" else 2 * acts + kernel
    return elements * DTYPE_BYTES[point.dtype]


def build(point: Point, device: str):
    """(fn, args): the compiled step for `point` and its inputs on `device`. fn returns all outputs
    (so neither grappler nor XLA can prune any of them) and last a scalar made from a corner of each;
    `.numpy()` on that scalar waits for the whole step, so asynchronous dispatch cannot fake the time."""
    import tensorflow as tf

    n, c, s, k = point.batch_size, point.hidden_dim, point.spatial, point.kernel_size
    shape = (n, s, s, c) if point.data_format == "NHWC" else (n, c, s, s)
    dtype = tf.as_dtype(point.dtype)
    with tf.device(device):
        x, dy = (tf.cast(tf.random.stateless_normal(shape, [0, i]), dtype) for i in (1, 2))
        kernel = tf.cast(tf.random.stateless_normal((k, k, c, 1), [0, 3]), dtype)

    def conv(x, kernel):
        return tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "SAME", data_format=point.data_format)

    def corner(*tensors):
        return tf.add_n([tf.reduce_sum(tf.cast(t[:1, :1, :1, :1], tf.float32)) for t in tensors])

    @tf.function(jit_compile=point.xla == "on")
    def step(x, kernel, dy):
        if point.pass_ == "forward":
            y = conv(x, kernel)
            return y, corner(y)
        with tf.GradientTape() as tape:
            tape.watch([x, kernel])
            y = conv(x, kernel)
        dx, dkernel = tape.gradient(y, [x, kernel], output_gradients=dy)
        return y, dx, dkernel, corner(y, dx, dkernel)

    def fn(*args):
        with tf.device(device):
            return step(*args)

    return fn, (x, kernel, dy)


def _reason(err: Exception) -> str:
    """The line of a TF error that says what went wrong: graph errors put it last, after the Python
    stack of the failing node and before the `[[node ...]]` marker; drop any {{function_node ...}}."""
    text = getattr(err, "message", str(err)).split("[[")[0].split("[Op:")[0]
    lines = [line for line in text.splitlines() if line.strip()] or [type(err).__name__]
    return " ".join(lines[-1].split("}}")[-1].split())[:160]


def run_point(point: Point, warmup: int, iters: int, device: str = "/CPU:0") -> dict:
    """Time `point`: one CSV/JSON row. The first call (trace + compile + run) is the support test."""
    import tensorflow as tf

    flops, nbytes = depthwise_flops(point), depthwise_bytes(point)
    row = {**dataclasses.asdict(point), "pass": point.pass_, "flops": flops, "bytes": nbytes}
    del row["pass_"]
    try:
        fn, args = build(point, device)
        fn(*args)[-1].numpy()
        times = time_calls(lambda: fn(*args)[-1].numpy(), max(warmup - 1, 0), iters)
    except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError, tf.errors.NotFoundError,
            tf.errors.ResourceExhaustedError) as err:  # out of memory: a row too, the grid goes on
        kind = "out of memory" if isinstance(err, tf.errors.ResourceExhaustedError) else "unsupported"
        return {**row, "status": f"{kind}: {_reason(err)}", "time_ms": None, "min_ms": None,
                "gflops": None, "gb_s": None}
    median = statistics.median(times)
    return {**row, "status": "ok", "time_ms": median * 1e3, "min_ms": min(times) * 1e3,
            "gflops": flops / median / 1e9, "gb_s": nbytes / median / 1e9}


def write_results(rows: list[dict], output_dir: str, device: str) -> None:
    """Write OUTPUT_DIR/kernel_bench.csv and kernel_bench.json, each atomically."""
    import tensorflow as tf

    meta = {"device": device, "tf_version": tf.__version__, "cpu_cores": len(os.sched_getaffinity(0))}
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    # Atomic (temp file + rename): readers and an interrupted run never see a half-written file.
    rundir.write_text(os.path.join(output_dir, "kernel_bench.csv"), table.getvalue())
    rundir.write_json(os.path.join(output_dir, "kernel_bench.json"), {**meta, "rows": rows})


def resolve_device(text: str) -> str:
    """"" -> "/GPU:0" if a GPU exists else "/CPU:0"; otherwise `text` if it names an existing device."""
    import tensorflow as tf

    if not text:
        return "/GPU:0" if tf.config.list_logical_devices("GPU") else "/CPU:0"
    existing = [d.name.replace("/device:", "/") for d in tf.config.list_logical_devices()]
    try:
        spec = tf.DeviceSpec.from_string(text)
    except ValueError:
        spec = None
    # tf.device would silently fall back to another device (soft placement), so check explicitly.
    if spec is None or f"/{spec.device_type}:{spec.device_index or 0}" not in existing:
        raise UsageError(f"--device={text!r}: expected one of {', '.join(existing)}")
    return text


def format_row(row: dict) -> str:
    """One table line; unsupported points show their reason instead of numbers."""
    head = (f"{row['kernel_size']:>2} {row['hidden_dim']:>5} {row['batch_size']:>5} {row['spatial']:>4} "
            f"{row['dtype']:>8} {row['data_format']:>4} {row['xla']:>3} {row['pass']:>16}")
    if row["status"] != "ok":
        return f"{head}  {row['status']}"
    return (f"{head} {row['time_ms']:9.3f} {row['min_ms']:9.3f} {row['gflops']:8.1f} {row['gb_s']:7.1f}")


def main(args: list[str], f: types.SimpleNamespace) -> None:
    if args:
        raise UsageError(f"unexpected arguments {args}")
    points = grid(parse_int_list("kernel_sizes", f.kernel_sizes, 1, 31),
                  parse_int_list("hidden_dims", f.hidden_dims), parse_int_list("batch_sizes", f.batch_sizes),
                  parse_int_list("spatial", f.spatial),
                  *(parse_choice_list(name, getattr(f, name), CHOICES[name]) for name in CHOICES))
    rundir.ensure_writable_dir(f.output_dir, f"--output_dir={f.output_dir}")
    from convmixer_dist.runtime import quiet_tensorflow_import

    quiet_tensorflow_import()  # TensorFlow's import-time C++ logs would bury the table.
    import tensorflow as tf

    # Each point is a new tf.function by design; TF would warn about "excessive retracing".
    tf.get_logger().setLevel("ERROR")
    device = resolve_device(f.device)
    print(f"{len(points)} points on {device}; times are the median and min of {f.iters} iterations")
    print(" k   dim batch   hw    dtype  fmt xla             pass median_ms    min_ms  GFLOP/s    GB/s")
    rows = []
    for point in points:
        rows.append(run_point(point, f.warmup, f.iters, device))
        print(format_row(rows[-1]), flush=True)
        write_results(rows, f.output_dir, device)
    print(f"wrote {os.path.join(f.output_dir, 'kernel_bench.csv')} and kernel_bench.json")
    if f.profile:
        tf.profiler.experimental.start(f.output_dir)
        try:
            for i, (point, row) in enumerate(zip(points, rows)):
                if row["status"] == "ok":
                    fn, args = build(point, device)
                    fn(*args)[-1].numpy()  # Compile outside the step marker.
                    with tf.profiler.experimental.Trace("kernel", step_num=i, _r=1):
                        fn(*args)[-1].numpy()
        finally:
            tf.profiler.experimental.stop()
        print(f"profile: tensorboard --logdir {f.output_dir}")


if __name__ == "__main__":
    cli.run_command(main, define_flags)
