"""Where the time of a profiled training window goes: step time, top ops, and the share of each kind
of work (depthwise conv, pointwise conv, batch norm, all-reduce, input, optimizer, ...).

    python -m convmixer_dist.main ... --profile_steps=10,20 --model_dir=runs/x   # capture a profile
    python -m convmixer_dist.perf.profile_report runs/x [--top=15] [--run=RUN] [--side=auto|host|device]
    python -m convmixer_dist.perf.profile_report runs/x/plugins/profile/RUN/HOST.xplane.pb   # one host

MODEL_DIR's newest run under plugins/profile/ is read (--run picks another; a run directory or a
single .xplane.pb works too), all its hosts together. The numbers come from the profiler's own
converters (xprof, what TensorBoard's Profile tab shows), not from walking the protobuf:

- `framework_op_stats` (the "TF op stats" table): one row per op with its layer path, type, Host or
  Device, and self time. Shares partition the summed self time of all ops, IDLE excluded. The table
  lists at most 500 ops; the remainder, known from its cumulative-percent column, counts as `other`.
  On a GPU the device ops are used (`--side=auto`); on CPU everything runs on the host. Host self
  time sums over threads, so per step it can exceed the wall-clock step time.
- XLA-compiled calls inside the step (the fused GELU of `--kernels=auto` on CPU): each runs as an
  asynchronous function-call op that the op table leaves out. `trace_viewer` has them as
  `ExecutorState::ProcessAsync::Start` events naming the op (its layer path), with the XLA run
  (`CpuExecutable::ExecuteAsyncOnStream`) nested inside; each such call is added as a row of type
  `XlaCall` with the call's duration as its self time (nothing inside it is in the op table). The
  trace keeps at most xprof's event limit (environment variable TF_PROFILER_TRACE_VIEWER_MAX_EVENTS):
  profile a few steps, as `--profile_steps` windows usually are, or raise the limit.
- Step time: `overview_page`'s average over step markers where it has one (GPU); on CPU it reports
  none, so the `train` step markers (`profiling.ProfileWindow`, one per step inside the window) are
  read from `trace_viewer` and averaged.

Kinds follow the model's layer names (`stem_conv`, `blockNN_depthwise_conv`, `blockNN_pointwise_bn`,
`head_dense`, ...), forward and backward (`gradient_tape/...`) alike, then op scope and type (see
`classify`): `all_reduce` includes the _Send/_Recv copies between replicas, `input` the tf.data
iterator ops and the ops of tf.data functions (outside the train loop), and `other` the loss, the
residual adds, the AddN ops summing gradients (they carry no layer name) and the unlisted rest;
`layout` is data movement without arithmetic inside the step wherever it is (transposes, pads,
dtype casts, oneDNN layout reorders), e.g. the transposes of the folded depthwise gradient.

Distance to the limit per kind: where MODEL_DIR's flags.txt describes the model, each kind gets its
work per step from the model's shapes (`flops.step_work`: FLOPs for the convolutions and the head,
minimum bytes for BatchNorm, the activation and the optimizer), an achieved rate (work x steps / the
kind's self time: TFLOP/s or GB/s) and its fraction of the achievable peak, measured by this command
(a matmul in the run's compute dtype, `flops.measure_matmul_tflops`; a streaming x * a + b,
`flops.measure_memory_gbps`) unless --peak_tflops / --peak_gbps give it. Run it on a quiet machine,
as the benchmark. Ops of different kinds can overlap in time (self time summed over threads exceeds
the step time), so a kind's rate is that of its own ops while sharing the cores, a lower bound.
Writes profile_report.json and profile_report.md in the run directory and prints the Markdown. The
converters also cache their results there (ALL_HOSTS.op_stats_v2.pb), as TensorBoard does.
"""
from __future__ import annotations

import bisect
import dataclasses
import glob
import json
import os
import re
import types
from typing import Sequence

from absl import flags

from convmixer_dist import flags as cli
from convmixer_dist import rundir
from convmixer_dist.errors import UsageError
from convmixer_dist.perf import kind_rates
from convmixer_dist.runtime import native_stderr_captured

REPORT_JSON, REPORT_MD = "profile_report.json", "profile_report.md"
MODEL_KINDS = ("depthwise_conv", "pointwise_conv", "stem_conv", "batch_norm", "activation", "head")
KINDS = MODEL_KINDS + ("all_reduce", "input", "optimizer", "layout", "other")  # They partition the op time.
UNLISTED = "(unlisted)"  # Type of the row standing for the ops beyond the converter's 500-row table.

# A layer in an op's path, as `model.py` names it; TF appends `_1` etc. to the scope.
_LAYER = re.compile(r"(?:^|/)(stem|head|block\d+)_(depthwise_conv|depthwise_act|depthwise_bn|pointwise_conv|"
                    r"pointwise_act|pointwise_bn|residual|dropout|conv|act|bn|pool|dense)(?:_\d+)?(?=/|$)")
_LAYER_KIND = {"depthwise_conv": "depthwise_conv", "pointwise_conv": "pointwise_conv", "conv": "stem_conv",
               "pool": "head", "dense": "head"}
# Collectives, and the _Send/_Recv copies that ReductionToOneDevice (MirroredStrategy on CPU) and
# HierarchicalCopy move gradients with; they are named after the gradient they carry, so the type decides.
_ALL_REDUCE = re.compile(r"Collective|Nccl|AllReduce|all-reduce|AllGather|all-gather|ReduceScatter|"
                         r"reduce-scatter|^_(Host)?(Send|Recv)$")
_INPUT = re.compile(r"Dataset$|Iterator|Infeed|^infeed")
_OPTIMIZER_SCOPE = re.compile(r"(?:^|/)(adam_w|adamw|adam|sgd|lamb|lion|rmsprop|adagrad|optimizer|"
                              r"loss_scale_optimizer)(?:_\d+)?/")
# Op types that mean one kind wherever they appear (ops that lost their layer path, e.g. under XLA).
_TYPE_KIND = [(re.compile(r"DepthwiseConv2dNative"), "depthwise_conv"),
              (re.compile(r"BatchNorm"), "batch_norm"),
              (re.compile(r"Gelu|Erfc?$|Relu|Elu$|Selu|Softplus|Sigmoid|Tanh"), "activation"),
              (re.compile(r"MatMul"), "head"),  # head_dense is the model's only dense layer.
              (re.compile(r"^ResourceApply|^Apply"), "optimizer")]
# Data movement without arithmetic wherever it appears: transposes, pads, dtype casts, oneDNN reorders.
_LAYOUT_TYPES = re.compile(r"Transpose$|^Cast$|^Pad(V2)?$|MklToTf|TfToMkl|DataFormat")
# Every op of a training step runs inside train_loop's `tf.range` loop (`while/...`); host ops
# outside it are tf.data functions (map, generator). Checkpoint writes are not input.
_TRAIN_LOOP = "while/"
XLA_CALL = "XlaCall"  # Type of the rows standing for XLA-compiled calls (read from the trace).
_NOT_INPUT_TYPES = re.compile(rf"SaveV2|RestoreV2|MergeV2Checkpoints|^{XLA_CALL}$")
_ASYNC_OP = "ExecutorState::ProcessAsync::Start"
_XLA_RUN = re.compile(r"^CpuExecutable::Execute")


@dataclasses.dataclass(frozen=True)
class OpRow:
    """One row of the profiler's framework op stats table (times summed over all occurrences)."""
    name: str  # e.g. while/body/_1/gradient_tape/while/convmixer_1/block00_depthwise_conv_1/...
    type: str  # e.g. _MklNativeDepthwiseConv2dNativeBackpropFilter
    side: str  # "host" or "device"
    occurrences: int
    self_ms: float


# ------------------------------------------------------------------------------- finding the profile
def find_profile(path: str, run: str | None = None) -> list[str]:
    """The .xplane.pb files to read: `path` itself if it is one, the files in `path` if it is a run
    directory, else those of MODEL_DIR/plugins/profile/<run> (default: the newest run)."""
    if path.endswith(".xplane.pb"):
        if not os.path.isfile(path):
            raise UsageError(f"{path}: no such profile file")
        return [path]
    if not os.path.isdir(path):
        raise UsageError(f"MODEL_DIR {path}: no such directory")
    here = sorted(glob.glob(os.path.join(path, "*.xplane.pb")))
    if here and run is None:
        return here
    runs_dir = os.path.join(path, "plugins", "profile")
    runs = sorted(os.path.basename(os.path.dirname(p))
                  for p in glob.glob(os.path.join(runs_dir, "*", "*.xplane.pb")))
    if not runs:
        raise UsageError(f"MODEL_DIR {path}: no profile found (plugins/profile/*/*.xplane.pb); "
                         "capture one with --profile_steps=START,END")
    if run is not None and run not in runs:
        raise UsageError(f"--run={run}: not a profile run of {path}; expected one of {sorted(set(runs))}")
    # Runs are named by their UTC start time (YYYY_MM_DD_HH_MM_SS), so the last name is the newest.
    chosen = run or runs[-1]
    return sorted(glob.glob(os.path.join(runs_dir, chosen, "*.xplane.pb")))


# ------------------------------------------------------------------------ reading through xprof
def _tool_json(paths: list[str], tool: str):
    """The converter's JSON for `tool`, or None if it failed (with the native log's last line)."""
    from xprof.convert import raw_to_tool_data

    # The converters' C++ code logs harmless lines (e.g. "No UnifiedProfileProcessor registered for
    # tool: trace_viewer") to fd 2: held back, the last one explains a failure.
    with native_stderr_captured() as log:
        data, _ = raw_to_tool_data.xspace_to_tool_data(paths, tool, {})
    if data is None:
        return None, (log[-1].split("] ", 1)[-1] if log else "no details")
    return json.loads(data), ""


def load_op_stats(paths: list[str]) -> list[OpRow]:
    """Rows of `framework_op_stats`, IDLE excluded, plus one UNLISTED row per side for the ops the
    converter left out of its 500-row table (so that the rows sum to the true total)."""
    tables, why = _tool_json(paths, "framework_op_stats")
    if not tables:
        raise UsageError(f"{paths[0]}: not a readable profile (framework_op_stats failed: {why})")
    # A list of google DataTables ({"cols": [{"id": ...}], "rows": [{"c": [{"v": ...}]}]}): the first
    # with the IDLE row, the second without it.
    table = next((t for t in tables if not any(r["c"][2]["v"] == "IDLE" for r in t["rows"])), tables[0])
    ids = [c["id"] for c in table["cols"]]
    rows, last_cumulative = [], {}
    for raw in table["rows"]:
        v = dict(zip(ids, [cell.get("v") if cell else None for cell in raw["c"]]))
        if v["type"] == "IDLE":
            continue
        side = "device" if v["host_or_device"] == "Device" else "host"
        rows.append(OpRow(v["operation"], v["type"], side, int(v["occurrences"]), v["total_self_time"] / 1e3))
        cumulative = (v["device_cumulative_total_self_time_percent"] if side == "device"
                      else v["Host_cumulative_total_self_time_percent"])  # a fraction, 0..1
        last_cumulative[side] = cumulative
    for side, cumulative in last_cumulative.items():
        listed = sum(r.self_ms for r in rows if r.side == side)
        if 0 < cumulative < 1:
            rows.append(OpRow(UNLISTED, UNLISTED, side, 0, listed / cumulative - listed))
    return rows


def load_trace(paths: list[str]) -> dict:
    """`trace_viewer`'s events ({"traceEvents": [...]}), or {} if the converter failed."""
    trace, _ = _tool_json(paths, "trace_viewer")
    return trace or {}


def load_step_times(paths: list[str], trace: dict | None = None) -> tuple[list[float], str | None]:
    """Wall-clock ms of each profiled step and where they came from: `overview_page` (device step
    times, GPU/TPU), else the step markers in `trace` (`trace_viewer`, converted here if not given);
    ([], None) if neither."""
    tables, _ = _tool_json(paths, "overview_page")
    for table in tables or []:
        if float((table.get("p") or {}).get("steptime_ms_average", 0) or 0) > 0:
            ids = [c["id"] for c in table["cols"]]
            steps = [dict(zip(ids, [c.get("v") if c else None for c in r["c"]])) for r in table["rows"]]
            times = [float(s["stepTimeMs"]) for s in steps if s.get("stepTimeMs") is not None]
            if times:
                return times, "overview_page"
    # Step markers are trace events carrying a step_num (Trace(..., step_num=..., _r=1)); with
    # several hosts each step has one marker per host, so steps are counted by number.
    trace = load_trace(paths) if trace is None else trace
    by_step: dict[str, list[float]] = {}
    for event in trace.get("traceEvents", []):
        if event.get("ph") == "X" and "step_num" in (event.get("args") or {}):
            by_step.setdefault(event["args"]["step_num"], []).append(event["dur"] / 1e3)
    if not by_step:
        return [], None
    return [sum(d) / len(d) for d in by_step.values()], "trace_viewer step markers"


def xla_call_rows(trace: dict) -> list[OpRow]:
    """One XLA_CALL row per op name for the XLA-compiled calls in `trace`, which the op table omits.

    A call is an `ExecutorState::ProcessAsync::Start` event (args: the op's `name`) with a
    `CpuExecutable::Execute...` event of the same thread inside its time span; asynchronous ops
    that run no XLA (iterators, collectives) are in the op table already and are not counted.
    """
    by_thread: dict[tuple, list[dict]] = {}
    for event in trace.get("traceEvents", []):
        if event.get("ph") == "X" and (event.get("name") == _ASYNC_OP or _XLA_RUN.match(event.get("name", ""))):
            by_thread.setdefault((event.get("pid"), event.get("tid")), []).append(event)
    calls: dict[str, list[float]] = {}
    for events in by_thread.values():
        runs = sorted(e["ts"] for e in events if e["name"] != _ASYNC_OP)
        for e in events:
            name = (e.get("args") or {}).get("name")
            if e["name"] != _ASYNC_OP or not name:
                continue
            first_run = bisect.bisect_left(runs, e["ts"])
            if first_run < len(runs) and runs[first_run] <= e["ts"] + e["dur"]:
                calls.setdefault(name, []).append(e["dur"] / 1e3)
    return [OpRow(name, XLA_CALL, "host", len(d), sum(d)) for name, d in sorted(calls.items())]


# ------------------------------------------------------------------------------------ analysis
def classify(op_name: str, op_type: str) -> str:
    """The kind of work an op does (one of KINDS), from its layer path, scope and type."""
    if op_type == UNLISTED:
        return "other"
    if _ALL_REDUCE.search(op_type):
        return "all_reduce"
    if _INPUT.search(op_type) or op_name.startswith("Iterator::"):
        return "input"
    if _OPTIMIZER_SCOPE.search(op_name):
        # The optimizer's own update has no AddN; under MirroredStrategy's ReductionToOneDevice the
        # AddN in its scope sums the replicas' gradients (batch_reduce_to inside apply_gradients).
        return "all_reduce" if op_type == "AddN" else "optimizer"
    if _LAYOUT_TYPES.search(op_type) and _TRAIN_LOOP in op_name:
        return "layout"
    layer = _LAYER.search(op_name)
    if layer:
        prefix, part = layer.groups()
        if part.endswith("_act") or part == "act":
            return "activation"
        if part.endswith("_bn") or part == "bn":
            return "batch_norm"
        return _LAYER_KIND.get(part, "head" if prefix == "head" else "other")  # residual, dropout
    for pattern, kind in _TYPE_KIND:
        if pattern.search(op_type):
            return kind
    if _TRAIN_LOOP not in op_name and not _NOT_INPUT_TYPES.search(op_type):
        return "input"
    return "other"  # e.g. the loss, and the AddN that sums the gradients of a fan-out tensor.


def block_of(op_name: str) -> str | None:
    """"blockNN" if the op belongs to a ConvMixer block's layer, else None."""
    layer = _LAYER.search(op_name)
    return layer.group(1) if layer and layer.group(1).startswith("block") else None


def pick_side(rows: list[OpRow], side: str = "auto") -> str:
    """"device" if asked, or if auto and the profile has device ops (GPU/TPU); else "host"."""
    has_device = any(r.side == "device" for r in rows)
    if side == "device" and not has_device:
        raise UsageError("--side=device: the profile has no device ops (a CPU-only run); "
                         "use --side=host or --side=auto")
    return side if side != "auto" else ("device" if has_device else "host")


def summarise(rows: list[OpRow], top: int, side: str = "auto", step_times_ms: Sequence[float] = ()
              ) -> dict:
    """Totals, shares per kind (they partition the side's self time), top ops and per-block time."""
    side = pick_side(rows, side)
    rows = [r for r in rows if r.side == side]
    total = sum(r.self_ms for r in rows)
    pct = (lambda ms: 100.0 * ms / total) if total > 0 else (lambda ms: 0.0)
    kinds_ms = dict.fromkeys(KINDS, 0.0)
    blocks: dict[str, dict] = {}
    for r in rows:
        kind = classify(r.name, r.type)
        kinds_ms[kind] += r.self_ms
        block = block_of(r.name)
        if block:
            entry = blocks.setdefault(block, {"ms": 0.0, "kinds_ms": {}})
            entry["ms"] += r.self_ms
            entry["kinds_ms"][kind] = entry["kinds_ms"].get(kind, 0.0) + r.self_ms
    for entry in blocks.values():
        entry["percent"] = pct(entry["ms"])
    ranked = sorted((r for r in rows if r.type != UNLISTED), key=lambda r: -r.self_ms)[:top]
    steps = len(step_times_ms)
    warnings = []
    if total > 0 and not any(kinds_ms[k] for k in MODEL_KINDS):
        # Seen with --xla=on on CPU: the whole compiled step is one call with no layer in its name.
        warnings.append("no op of the model's layers in the profile: with --xla=on the step is one "
                        "XLA-compiled call that the profiler does not split by layer; profile with "
                        "--xla=off for layer times")
    return {
        "device": side,
        "warnings": warnings,
        "steps": steps or None,
        "step_time_ms": sum(step_times_ms) / steps if steps else None,
        "total_self_time_ms": total,
        "self_time_per_step_ms": total / steps if steps else None,
        "kinds_ms": kinds_ms,
        "shares": {k: pct(ms) for k, ms in kinds_ms.items()},
        "top_ops": [{"name": r.name, "type": r.type, "kind": classify(r.name, r.type),
                     "self_ms": r.self_ms, "percent": pct(r.self_ms), "occurrences": r.occurrences}
                    for r in ranked],
        "blocks": dict(sorted(blocks.items())),
    }


def build_report(paths: list[str], top: int = 15, side: str = "auto", peak_tflops: float = 0.0,
                 peak_gbps: float = 0.0, rates: bool = True) -> dict:
    """Read the profile's hosts through xprof and summarise them; with `rates` (and the run's
    flags.txt), each kind's achieved rate against the peaks (measured where not given)."""
    rows = load_op_stats(paths)
    if not rows:  # An empty or truncated .xplane.pb reads as a profile without ops: not a report.
        raise UsageError(f"{', '.join(paths)}: the profile holds no op statistics (an empty or truncated "
                         ".xplane.pb?); capture it again with --profile_steps=START,END")
    trace = None
    if pick_side(rows, side) == "host":  # XLA calls are host rows; a GPU's trace can be large
        trace = load_trace(paths)
        rows += xla_call_rows(trace)
    step_times, source = load_step_times(paths, trace)
    report = {"profile": os.path.dirname(os.path.abspath(paths[0])),
              "xplane_files": [os.path.basename(p) for p in paths],
              "step_time_source": source}
    report.update(summarise(rows, top, side, step_times))
    work, policy = kind_rates.run_work(paths) if rates else ({}, None)
    report["precision"], report["work_per_step"], report["rates"] = policy, work, {}
    if work and report["steps"]:
        report.update(kind_rates.measure_peaks(policy, peak_tflops, peak_gbps))
        report["rates"] = kind_rates.kind_rates(report["kinds_ms"], report["steps"], work,
                                     report["peak_tflops"], report["peak_gbps"])
    return report


def _rate_cells(rate: dict | None) -> str:
    """"| 0.123 TFLOP/s | 52% |" for a kind's rate, or empty cells."""
    if not rate:
        return "| | |"
    text = f"{rate['tflops']:.3g} TFLOP/s" if "tflops" in rate else f"{rate['gbps']:.3g} GB/s"
    return f"| {text} | {rate['of_peak']:.0%} |" if rate["of_peak"] else f"| {text} | |"


# ------------------------------------------------------------------------------------- output
def to_markdown(report: dict) -> str:
    """The report as Markdown: a summary line, kinds, top ops, blocks."""
    where = f"{report['device']}-side ops"  # "device" on a GPU/TPU (--side=auto), else "host"
    if report["steps"]:
        steps = (f"{report['steps']} steps, {report['step_time_ms']:.2f} ms/step "
                 f"(from {report['step_time_source']}); op self time {report['self_time_per_step_ms']:.2f}"
                 f" ms/step, summed over threads")
    else:
        steps = "steps unknown (no step markers in the profile)"
    lines = [f"# Profile report: {report['profile']}", "",
             f"{where}: {report['total_self_time_ms']:.2f} ms self time in total; {steps}.", ""]
    lines += [f"**Warning:** {w}." for w in report["warnings"]] + [""] * bool(report["warnings"])
    if report.get("rates"):
        lines += [f"Achieved rate per kind against the peaks: {report['peak_tflops']:.3f} TFLOP/s "
                  f"({report['peak_tflops_source']}), {report['peak_gbps']:.1f} GB/s "
                  f"({report['peak_gbps_source']}); precision {report['precision']}.", ""]
    lines += ["| kind | ms | % | achieved | of peak |", "|---|---:|---:|---:|---:|"]
    for kind in sorted(report["kinds_ms"], key=lambda k: -report["kinds_ms"][k]):
        lines.append(f"| {kind} | {report['kinds_ms'][kind]:.2f} | {report['shares'][kind]:.1f} "
                     + _rate_cells(report.get("rates", {}).get(kind)))
    lines += ["", f"## Top {len(report['top_ops'])} ops by self time", "",
              "| # | op | type | kind | ms | % |", "|---:|---|---|---|---:|---:|"]
    for i, op in enumerate(report["top_ops"], 1):
        lines.append(f"| {i} | {op['name']} | {op['type']} | {op['kind']} | {op['self_ms']:.2f} "
                     f"| {op['percent']:.1f} |")
    if report["blocks"]:
        lines += ["", "## ConvMixer blocks", "", "| block | ms | % | depthwise_conv | pointwise_conv |",
                  "|---|---:|---:|---:|---:|"]
        for name, b in report["blocks"].items():
            lines.append(f"| {name} | {b['ms']:.2f} | {b['percent']:.1f} "
                         f"| {b['kinds_ms'].get('depthwise_conv', 0.0):.2f} "
                         f"| {b['kinds_ms'].get('pointwise_conv', 0.0):.2f} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict) -> tuple[str, str]:
    """profile_report.json and profile_report.md in the profile's run directory."""
    json_path = os.path.join(report["profile"], REPORT_JSON)
    md_path = os.path.join(report["profile"], REPORT_MD)
    try:
        rundir.write_json(json_path, report)
        rundir.write_text(md_path, to_markdown(report))
    except OSError as err:
        raise UsageError(f"{report['profile']}: cannot write the report there ({err.strerror})")
    return json_path, md_path


# ---------------------------------------------------------------------------------------- command
def define_flags() -> None:
    flags.DEFINE_string("run", None, "Profile run under MODEL_DIR/plugins/profile/ (default: the newest).")
    cli.define_number("top", 15, 1, 10 ** 4, "How many ops to list by self time.")
    flags.DEFINE_enum("side", "auto", ["auto", "host", "device"],
                      "Whose op time to analyse: auto = device ops if the profile has any, else host.")
    cli.define_number("peak_tflops", 0.0, 0.0, 1e6, "Peak TFLOP/s the convolutions' rates are compared "
                      "with; 0 = measure it now (a matmul in the run's compute dtype).")
    cli.define_number("peak_gbps", 0.0, 0.0, 1e7, "Peak GB/s the element-wise kinds' rates are compared "
                      "with; 0 = measure it now (a streaming x * a + b).")
    flags.DEFINE_boolean("rates", True, "Achieved rate per kind from the run's flags.txt (model shapes).")


def main(args: list[str], f: types.SimpleNamespace) -> None:
    if len(args) != 1:
        raise UsageError("expected one MODEL_DIR (or a profile run directory or .xplane.pb file); "
                         "usage: python -m convmixer_dist.perf.profile_report MODEL_DIR [--top=N] [--run=RUN]")
    report = build_report(find_profile(args[0], f.run), f.top, f.side, f.peak_tflops, f.peak_gbps,
                          f.rates)
    json_path, md_path = write_report(report)
    print(to_markdown(report), flush=True)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    cli.run_command(main, define_flags)
