"""Scaling: measured on the multi-host test bed of this machine, or predicted for N GPUs (`--predict`).

    # Measured (root; brings up the test bed of launch/testing/netns_cluster.sh and removes it):
    python -m convmixer_dist.perf.scaling --workers=2 --per_device_batch=32 --model=convmixer_256_8 \
        --clip_norm=1 --steps_per_loop=5 --window_steps=5 --windows=3 --rate=unshaped,100mbit \
        --variants=precision=mixed_bfloat16 --output=runs/scaling.json
    # Predicted (arithmetic, see scaling_model.py):
    python -m convmixer_dist.perf.scaling --predict --model=convmixer_1536_20 --per_device_batch=64 \
        --peak_tflops=990 --mfu=0.4 --inter_node_gbps=100,200,400

Measured mode takes every training flag (as `perf.benchmark`) and, for the base settings and each
`--variants` item (any training setting NAME=VALUE, e.g. allreduce_dtype=bfloat16), times with
`perf.benchmark` (input excluded, median of `--windows`), every process in a host namespace of the
test bed and pinned to its own core with taskset:
- single: 1 worker, one_device, --per_device_batch B;
- independent: N such processes at once, one per host and core (no communication: what the
  machine's shared memory bandwidth and caches allow N workers);
- strong reference: 1 worker at N x B;
- multi: N workers under multi_worker (TF_CONFIG with the hosts' addresses), global batch N x B,
  once per `--rate` (the bed's links reshaped in place between them).
The efficiencies, the compute/communication split and the bytes are derived as scaling_model.py
states. Bytes on the wire: every host's sent/received byte counters (its veth link, read in the bed's
switch namespace) when worker 0 prints the end of timed window 1 and of the last window, divided by
the steps in between. The traced graph's all-reduces per step come from each worker's benchmark
JSON (`collectives`, where perf.benchmark records them). JSON (`--output`) plus a table.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from absl import flags

from convmixer_dist import config as cfg
from convmixer_dist import flags as cli
from convmixer_dist import rundir
from convmixer_dist.errors import UsageError
from convmixer_dist.perf import scaling_model as sm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BED_SCRIPT = os.path.join(ROOT, "launch", "testing", "netns_cluster.sh")
RATE = re.compile(r"[0-9]+(\.[0-9]+)?(bit|kbit|mbit|gbit)")
WINDOW_LINE = re.compile(r"^\s+custom_input_excluded: window (\d+)/(\d+) ")
# Settings the measured runs set themselves: neither a training flag nor a variant may change them.
CONTROLLED = ("strategy", "global_batch_size", "cpu_replicas", "num_gpus", "cluster")

# The tool's arguments and their bounds, declared once: (name, default, low, high, help).
FLOAT_ARGS = [
    ("step_time_ms", 0.0, 0.0, 1e7, "--predict: single-device step time at --per_device_batch; 0 = "
     "from FLOPs (3 x forward x batch / (--peak_tflops x --mfu))."),
    ("peak_tflops", 990.0, 0.001, 1e5, "--predict: device peak TFLOP/s for the FLOPs-based step time "
     "(H100/H200 SXM dense bfloat16: 990)."),
    ("mfu", 0.4, 0.001, 1.0, "--predict: fraction of the peak the step achieves (FLOPs-based step time)."),
    ("nvlink_gbytes", 450.0, 0.001, 1e5, "--predict: inside a node, GB/s per GPU and direction "
     "(NVLink 4: 450)."),
    ("latency_us", 5.0, 0.0, 1e6, "--predict: network latency per ring step, microseconds."),
    ("bucket_mb", 25.0, 0.001, 1e6, "--predict: gradient bucket (MB) for the overlap model: the last "
     "one cannot overlap."),
    ("run_timeout", 1800.0, 1.0, 86400.0, "Measured: seconds one run (its processes together) may take."),
]
INT_ARGS = [
    ("per_device_batch", 64, 1, 65536, "Images per device and step (a GPU of --predict, a worker of the "
     "measured runs); weak scaling keeps it fixed."),
    ("gpus_per_node", 8, 1, 1024, "--predict: GPUs per node (NVLink domain)."),
    ("nics_per_node", 1, 1, 64, "--predict: network links per node, each of --inter_node_gbps."),
    ("workers", 2, 2, 253, "Measured: N, the workers (test-bed hosts, one core each) of the multi runs."),
    ("warmup_windows", 1, 0, 1000, "Measured: untimed windows first (tracing), as perf.benchmark."),
    ("windows", 3, 2, 1000, "Measured: timed windows per run (>= 2: the byte counters are read between "
     "the first and the last); the median is reported."),
    ("window_steps", 10, 1, 100000, "Measured: steps per window (a multiple of --steps_per_loop)."),
    ("port", 2222, 1, 65535, "Measured: the multi_worker port on every host."),
]


def define_flags() -> None:
    flags.DEFINE_boolean("predict", False, "Predict step time and efficiency for N GPUs (arithmetic) "
                         "instead of measuring on the test bed.")
    for name, default, low, high, text in FLOAT_ARGS:
        flags.DEFINE_float(name, default, text, lower_bound=low, upper_bound=high)
    for name, default, low, high, text in INT_ARGS:
        flags.DEFINE_integer(name, default, text, lower_bound=low, upper_bound=high)
    flags.DEFINE_list("gpus", [str(n) for n in sm.DEFAULT_GPUS], "--predict: GPU counts (1..1048576).")
    flags.DEFINE_list("inter_node_gbps", ["100"], "--predict: network rate per link between nodes, Gb/s "
                      "(one table each), 0.001..1e6.")
    flags.DEFINE_list("algorithms", list(sm.ALGORITHMS), "--predict: all-reduce algorithms to tabulate: "
                      + ", ".join(sm.ALGORITHMS) + ".")
    flags.DEFINE_list("reduction_dtypes", ["float32", "bfloat16"], "--predict: gradient reduction dtypes "
                      "to tabulate: " + ", ".join(sm.DTYPE_BYTES) + ".")
    flags.DEFINE_list("rate", [], "Measured: the test bed's link rates to run the multi runs at, each "
                      "'unshaped' or a tc rate (100mbit, 1gbit); empty = unshaped (or, with --testbed, "
                      "the bed as it is).")
    flags.DEFINE_list("variants", [], "Measured: more sets of runs, each with one training setting "
                      "changed (NAME=VALUE, any training flag but " + ", ".join(CONTROLLED) + "), e.g. "
                      "allreduce_dtype=bfloat16,clip_norm=0.")
    flags.DEFINE_list("cores", [], "Measured: the core of each worker (N numbers); default: the first N "
                       "cores this process may use.")
    flags.DEFINE_string("testbed", "", "Measured: the namespace prefix of a test bed that is already up "
                        "(netns_cluster.sh's NETNS_CLUSTER_PREFIX) to use as it is; empty = bring one up "
                        "and remove it afterwards.")
    flags.DEFINE_string("output", "", "Also write the JSON result here (measured: default "
                        "runs/scaling.json).")


def _numbers(flag: str, items: list[str], kind, low: float, high: float) -> list:
    try:
        values = [kind(item) for item in items]
    except ValueError:
        raise UsageError(f"--{flag}={','.join(items)}: expected a list of numbers") from None
    if not values or any(not low <= v <= high for v in values):
        raise UsageError(f"--{flag}={','.join(items)}: expected numbers in [{low:g}, {high:g}]")
    return values


# --- the test bed ------------------------------------------------------------------------------

@dataclasses.dataclass
class Bed:
    prefix: str
    hosts: list[str]
    created: bool
    rate: str

    def namespace(self, index: int) -> str:
        return f"{self.prefix}-{index}"


def _bed_script(*args: str, prefix: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, NETNS_CLUSTER_PREFIX=prefix, NETNS_CLUSTER_DIR=f"/tmp/{prefix}")
    return subprocess.run(["bash", BED_SCRIPT, *args], env=env, capture_output=True, text=True, timeout=600)


def _hosts(prefix: str) -> list[str]:
    with open(f"/tmp/{prefix}/hosts") as f:
        return f.read().split()


def bed_up(prefix: str, workers: int, rate: str, created: bool) -> Bed:
    """`netns_cluster.sh up` (again: reshapes the links in place)."""
    result = _bed_script("up", str(workers), *([f"--rate={rate}"] if rate != "unshaped" else []), prefix=prefix)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or [f"exit {result.returncode}"]
        raise UsageError(f"perf.scaling: the test bed did not come up: {lines[-1]}")
    return Bed(prefix, _hosts(prefix), created, rate)


def existing_bed(prefix: str, workers: int) -> Bed:
    status = _bed_script("status", prefix=prefix)
    found = re.search(r"^prefix=\S+ dir=(\S+) n=(\d+) rate=(\S+)", status.stdout, re.M)
    if status.returncode != 0 or not found:
        raise UsageError(f"--testbed={prefix}: no test bed is up with that prefix "
                         f"(launch/testing/netns_cluster.sh status: {status.stdout.strip()[:120]})")
    if found.group(1) != f"/tmp/{prefix}" or int(found.group(2)) < workers:
        raise UsageError(f"--testbed={prefix}: expected a bed of at least --workers={workers} hosts with its "
                         f"files in /tmp/{prefix}, found n={found.group(2)} in {found.group(1)}")
    return Bed(prefix, _hosts(prefix)[:workers], False, found.group(3))


def link_counters(bed: Bed, workers: int) -> list[tuple[int, int]]:
    """(bytes sent, bytes received) of hosts 0..N-1: the switch ends of their links count them
    (what host i sends, its link h<i> receives)."""
    listed = subprocess.run(["ip", "-j", "-s", "-n", f"{bed.prefix}-sw", "link", "show"], capture_output=True,
                            text=True, check=True, timeout=30).stdout
    stats = {link["ifname"]: link["stats64"] for link in json.loads(listed)}
    return [(stats[f"h{i}"]["rx"]["bytes"], stats[f"h{i}"]["tx"]["bytes"]) for i in range(workers)]


# --- processes ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Process:
    label: str
    namespace: str
    core: int
    argv: list[str]
    output: str
    log: str
    tf_config: str | None = None


def _start(p: Process, pipe: bool) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    env.pop("TF_CONFIG", None)
    if p.tf_config:
        env["TF_CONFIG"] = p.tf_config
    command = ["ip", "netns", "exec", p.namespace, "taskset", "-c", str(p.core), sys.executable, "-m",
               "convmixer_dist.perf.benchmark", *p.argv, f"--output={p.output}"]
    log = open(p.log, "w")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE if pipe else log, stderr=subprocess.STDOUT,
                            text=True, env=env)
    proc.log_file = log  # closed by _run
    return proc


def _follow(proc: subprocess.Popen, sample, samples: dict) -> None:
    """Copy the first worker's output to its log; at each timed-window line, read the counters."""
    for line in proc.stdout:
        proc.log_file.write(line)
        proc.log_file.flush()
        window = WINDOW_LINE.match(line)
        if window and sample is not None:
            samples[int(window.group(1))] = sample()


def _run(processes: list[Process], sample, timeout: float, what: str) -> tuple[list[dict], dict]:
    """Run the processes together; their benchmark JSONs and, with `sample`, the counter samples
    {window number: sample()} taken from the first process's window lines."""
    procs, samples = [], {}
    try:
        for i, p in enumerate(processes):
            procs.append(_start(p, pipe=i == 0))
        reader = threading.Thread(target=_follow, args=(procs[0], sample, samples), daemon=True)
        reader.start()
        deadline = time.monotonic() + timeout
        while any(proc.poll() is None for proc in procs):
            failed = [(p, proc) for p, proc in zip(processes, procs) if proc.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                p, proc = failed[0] if failed else (processes[0], procs[0])
                reason = f"exited with {proc.returncode}" if failed else f"did not finish in {timeout:g} s"
                raise UsageError(f"perf.scaling: {what}: {p.label} {reason}; see {p.log}")
            time.sleep(0.1)
        reader.join(timeout=30)
        failed = [p for p, proc in zip(processes, procs) if proc.returncode != 0]
        if failed:
            raise UsageError(f"perf.scaling: {what}: {failed[0].label} failed; see {failed[0].log}")
    finally:
        for proc in procs:  # only what this function started, by its pid
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.log_file.close()
    results = []
    for p in processes:
        with open(p.output) as f:
            results.append(json.load(f))
    return results, samples


def _timing(result: dict) -> dict:
    run = result["runs"]["custom_input_excluded"]
    return {key: run[key] for key in ("images_per_sec", "step_time_ms", "window_images_per_sec")}


# --- the measured runs -------------------------------------------------------------------------

def parse_variants(items: list[str], values: dict) -> list[tuple[str, cfg.Config]]:
    """[("base", the configured settings)] + one (item, settings with that one changed) per
    `NAME=VALUE` item; NAME is any training setting but the ones the runs set (CONTROLLED)."""
    variants = [("base", cli.resolve(values))]
    for item in items:
        name, sep, text = item.partition("=")
        try:
            cfg.setting_field(name)
            known = bool(sep) and name not in CONTROLLED
        except KeyError:
            known = False
        if not known:
            raise UsageError(f"--variants: {item!r}: expected NAME=VALUE with NAME a training setting other "
                             f"than {', '.join(CONTROLLED)}")
        try:
            value = cfg.value_from_text(name, text)
            cfg.check_setting(name, value)
            variants.append((item, cli.resolve({**values, name: value})))
        except (ValueError, UsageError) as err:
            raise UsageError(f"--variants: {item!r}: {err}") from None
    return variants


def _check_measured(opts, variants: list[tuple[str, cfg.Config]]) -> tuple[list[str], list[int]]:
    """One-line errors before anything starts; returns the rates and the workers' cores."""
    given = [name for name in CONTROLLED if name in opts.overrides]
    if given:
        raise UsageError(f"--{given[0]}: perf.scaling sets it for each run (one_device, multi_worker; "
                         f"the batch from --per_device_batch)")
    if os.geteuid() != 0:
        raise UsageError("perf.scaling: the measured runs need root (the test bed's network namespaces); "
                         "--predict needs nothing")
    if not os.path.exists(BED_SCRIPT):
        raise UsageError(f"perf.scaling: {BED_SCRIPT} is missing: run from a checkout of the repository")
    for label, config in variants:
        if opts.window_steps % config.steps_per_loop:
            raise UsageError(f"--window_steps={opts.window_steps} must be a multiple of --steps_per_loop="
                             f"{config.steps_per_loop}" + ("" if label == "base" else f" (--variants {label})"))
    bad = [r for r in opts.rate if r != "unshaped" and not RATE.fullmatch(r)]
    if bad:
        raise UsageError(f"--rate={bad[0]}: expected unshaped or a rate like 100mbit or 1gbit")
    if opts.testbed and opts.rate:
        raise UsageError("--rate with --testbed: the bed is used as it is; reshape it with "
                         "launch/testing/netns_cluster.sh up N --rate=R, or leave out --testbed")
    if opts.testbed and not re.fullmatch(r"[a-z][a-z0-9]{0,7}", opts.testbed):
        raise UsageError(f"--testbed={opts.testbed}: expected a netns_cluster.sh prefix (1-8 lower-case "
                         "letters or digits, starting with a letter)")
    usable = sorted(os.sched_getaffinity(0))
    cores = _numbers("cores", opts.cores, int, 0, 1 << 16) if opts.cores else usable[:opts.workers]
    if len(cores) != opts.workers or not set(cores) <= set(usable):
        raise UsageError(f"--cores={','.join(map(str, cores))}: expected {opts.workers} cores (one per "
                         f"worker) of those this process may use: {','.join(map(str, usable))}")
    rundir.ensure_writable_file(opts.output, f"--output={opts.output}")
    return list(dict.fromkeys(opts.rate or ["unshaped"])), cores


def _benchmark_args(flagfile: str, strategy: str, batch: int, opts) -> list[str]:
    return [f"--flagfile={flagfile}", f"--strategy={strategy}", f"--global_batch_size={batch}",
            *(["--cluster=tf_config"] if strategy == "multi_worker" else []), "--measure=train",
            "--pipeline=excluded", "--nomeasure_peak", f"--warmup_windows={opts.warmup_windows}",
            f"--windows={opts.windows}", f"--window_steps={opts.window_steps}"]


def _wire(samples: dict, opts) -> dict | None:
    """Bytes each worker sent and received per step, averaged over the workers, between the ends of
    timed window 1 and of the last one."""
    first, last = samples.get(1), samples.get(opts.windows)
    if first is None or last is None:
        return None
    steps = (opts.windows - 1) * opts.window_steps
    sent = [(b[0] - a[0]) / steps for a, b in zip(first, last)]
    received = [(b[1] - a[1]) / steps for a, b in zip(first, last)]
    return {"tx_bytes_per_step": sum(sent) / len(sent), "rx_bytes_per_step": sum(received) / len(received),
            "tx_bytes_per_step_by_worker": sent, "steps_counted": steps}


def _run_variant(label: str, config: cfg.Config, bed: Bed, rates: list[str], cores: list[int],
                 work: str, opts) -> tuple[dict, Bed]:
    """Every run of one set of settings; returns its JSON part (and the bed, reshaped)."""
    n, batch, slug = opts.workers, opts.per_device_batch, re.sub(r"[^A-Za-z0-9_.-]", "_", label)
    flagfile = os.path.join(work, f"{slug}.flags")
    rundir.write_text(flagfile, config.to_flagfile())

    def process(kind: str, i: int, strategy: str, global_batch: int, tf_config: str | None = None):
        name = os.path.join(work, f"{slug}.{kind}.{i}")
        return Process(f"worker {i} of the {kind} run [{label}]", bed.namespace(i), cores[i],
                       _benchmark_args(flagfile, strategy, global_batch, opts), f"{name}.json", f"{name}.log",
                       tf_config)

    def run(processes, sample=None):
        start = time.monotonic()
        outcome = _run(processes, sample, opts.run_timeout, f"[{label}]")
        print(f"{processes[0].label.split(' of the ')[1]}: {len(processes)} process(es), "
              f"{_timing(outcome[0][0])['images_per_sec']:.1f} img/s ({time.monotonic() - start:.0f} s)", flush=True)
        return outcome

    single = run([process("single", 0, "one_device", batch)])[0][0]
    independent = run([process("independent", i, "one_device", batch) for i in range(n)])[0]
    strong = run([process("strong-reference", 0, "one_device", n * batch)])[0][0]
    merged = {"images_per_sec": sum(_timing(r)["images_per_sec"] for r in independent),
              "step_time_ms": sum(_timing(r)["step_time_ms"] for r in independent) / n,
              "per_process": [_timing(r) for r in independent]}
    part = {"settings": {} if label == "base" else {label.split("=")[0]: getattr(config, label.split("=")[0])},
            "single": _timing(single), "independent": merged, "strong_reference": _timing(strong), "multi": {},
            "setup": single["setup"]}
    gradient_bytes = 4 * sm.gradient_parameters(config.hidden_dim, config.depth, config.kernel_size,
                                                config.patch_size, config.num_classes)
    for rate in rates:
        if bed.created and rate != bed.rate:
            bed = bed_up(bed.prefix, n, rate, created=True)
        cluster = [f"{host}:{opts.port}" for host in bed.hosts]
        tf_configs = [json.dumps({"cluster": {"worker": cluster}, "task": {"type": "worker", "index": i}})
                      for i in range(n)]
        results, samples = run([process(f"multi-{bed.rate}", i, "multi_worker", n * batch, tf_configs[i])
                                for i in range(n)], lambda: link_counters(bed, n))
        wire = _wire(samples, opts)
        graph = results[0]["runs"]["custom_input_excluded"].get("collectives")
        row = sm.measured_row(n, part["single"], merged, part["strong_reference"], _timing(results[0]), wire,
                              graph, gradient_bytes)
        part["multi"][bed.rate] = {**row, "wire": wire, "graph": graph,
                                   "workers_images_per_sec": [_timing(r)["images_per_sec"] for r in results],
                                   "window_images_per_sec": _timing(results[0])["window_images_per_sec"]}
    return part, bed


def run_measured(opts) -> dict:
    variants = parse_variants(opts.variants, cli.values_from_flags())
    opts.output = opts.output or "runs/scaling.json"
    rates, cores = _check_measured(opts, variants)
    base = variants[0][1]
    result = {"setup": {
        "workers": opts.workers, "per_device_batch": opts.per_device_batch, "cores": cores,
        "windows": opts.windows, "window_steps": opts.window_steps, "warmup_windows": opts.warmup_windows,
        "model": {name: getattr(base, name) for name in ("model", "hidden_dim", "depth", "kernel_size",
                                                        "patch_size", "image_size", "num_classes")},
        "gradient_parameters": sm.gradient_parameters(base.hidden_dim, base.depth, base.kernel_size,
                                                      base.patch_size, base.num_classes),
        "load_average_at_start": os.getloadavg()[0],
        "command": " ".join(["python -m convmixer_dist.perf.scaling"] + sys.argv[1:])}, "variants": {}}
    if opts.testbed:
        bed = existing_bed(opts.testbed, opts.workers)
    else:
        bed = bed_up(f"sc{os.getpid() % 1000000}", opts.workers, rates[0], created=True)
    work = tempfile.mkdtemp(prefix="scaling-")
    try:
        result["setup"]["testbed"] = {"prefix": bed.prefix, "created": bed.created, "hosts": bed.hosts}
        for label, config in variants:
            result["variants"][label], bed = _run_variant(label, config, bed, rates if bed.created else [bed.rate],
                                                          cores, work, opts)
    finally:
        if bed.created:
            _bed_script("down", prefix=bed.prefix)
    rows = [{"variant": label, "rate": rate, **row} for label, part in result["variants"].items()
            for rate, row in part["multi"].items()]
    result["table"] = sm.format_measured_table(rows)
    print(f"\n{opts.workers} workers x {opts.per_device_batch} images, one core each "
          f"(efficiencies: scaling_model.py)\n{result['table']}", flush=True)
    rundir.write_json(opts.output, result)
    shutil.rmtree(work, ignore_errors=True)
    print(f"Saved {opts.output}", flush=True)
    return result


def main(args: list[str], opts) -> None:
    if args:
        raise UsageError(f"unexpected arguments {args}")
    if not opts.predict:
        run_measured(opts)
        return
    for flag, items, known in [("algorithms", opts.algorithms, sm.ALGORITHMS),
                               ("reduction_dtypes", opts.reduction_dtypes, sm.DTYPE_BYTES)]:
        if not items or not set(items) <= set(known):
            raise UsageError(f"--{flag}={','.join(items)}: expected some of {', '.join(known)}")
    result = sm.run_predict(opts, _numbers("gpus", opts.gpus, int, 1, 1 << 20),
                            _numbers("inter_node_gbps", opts.inter_node_gbps, float, 0.001, 1e6),
                            opts.reduction_dtypes, opts.algorithms)
    if opts.output:
        rundir.write_json(opts.output, result)
        print(f"Saved {opts.output}")


if __name__ == "__main__":
    cli.run_command(main, define_flags, training=True)
    sys.exit(0)
