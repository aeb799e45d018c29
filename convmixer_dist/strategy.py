"""One validated factory from the config to a tf.distribute strategy.

- `one_device`: the first GPU, or the CPU.
- `mirrored`: all (or `--num_gpus`) local GPUs; without GPUs, `--cpu_replicas` logical CPU devices.
- `multi_worker`: MultiWorkerMirroredStrategy over the cluster in TF_CONFIG (or Slurm's environment).

`configure_devices` must run before TensorFlow initialises its runtime, and MultiWorkerMirroredStrategy
must be created before any other TensorFlow op; `main` therefore calls `create_strategy` first.
Its start-up is bounded by `--startup_timeout` and stays interruptible (startup.py).
"""
from __future__ import annotations

import json
import os
import re

import tensorflow as tf

from convmixer_dist import cluster, startup
from convmixer_dist.config import Config
from convmixer_dist.errors import UsageError


def configure_devices(cpu_replicas: int) -> None:
    """Split the host CPU into `cpu_replicas` logical devices (no-op for 1 or once TF is initialised
    with at least that many)."""
    cpus = tf.config.list_physical_devices("CPU")
    if cpu_replicas <= 1:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(cpu_replicas)])
    except RuntimeError:
        # The runtime is already initialised (e.g. a second run in the same process): reuse what exists.
        available = len(tf.config.list_logical_devices("CPU"))
        if available < cpu_replicas:
            raise UsageError(f"--cpu_replicas={cpu_replicas}: TensorFlow already started with "
                             f"{available} logical CPU devices in this process") from None


def _local_gpus(num_gpus: int) -> list[str]:
    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    if num_gpus >= 0:
        if num_gpus > len(gpus):
            raise UsageError(f"--num_gpus={num_gpus} but only {len(gpus)} GPU(s) are visible")
        gpus = gpus[:num_gpus]
    return gpus


def _mirrored_cross_device_ops(all_reduce: str, on_gpu: bool):
    if all_reduce == "nccl":
        if not on_gpu:
            raise UsageError("--all_reduce=nccl needs GPUs; use auto or hierarchical_copy on CPU")
        return tf.distribute.NcclAllReduce(num_packs=1)
    if all_reduce == "hierarchical_copy":
        return tf.distribute.HierarchicalCopyAllReduce()
    if not on_gpu:
        # NCCL (the GPU default) does not exist on CPU; reduce through one device instead.
        return tf.distribute.ReductionToOneDevice()
    return None  # auto on GPUs: TensorFlow picks NCCL when available.


TASK_TYPES = ("worker", "chief")


def refuse_other_tasks(spec) -> None:
    """UsageError for TF_CONFIG task types this trainer does not run (a side-car `evaluator`, `ps`):
    such a task would train a private copy and write nothing."""
    if not isinstance(spec, dict):
        return
    cluster = spec.get("cluster") if isinstance(spec.get("cluster"), dict) else {}
    task = spec.get("task") if isinstance(spec.get("task"), dict) else {}
    others = sorted({str(task.get("type", "worker"))} | set(cluster)) if task or cluster else []
    others = [t for t in others if t not in TASK_TYPES]
    if others:
        raise UsageError(f"TF_CONFIG task type {others[0]!r} is not supported: only 'worker' (and 'chief') tasks are "
                         "run; evaluate with `python -m convmixer_dist.evaluate --model_dir=...` "
                         "instead of a side-car evaluator")


_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)")


def check_address(address, where: str) -> None:
    """UsageError unless `address` is a string "host:port" (host a name, an IPv4 address or an
    [IPv6] address; port a decimal number in 1..65535)."""
    if not isinstance(address, str):
        raise UsageError(f"TF_CONFIG {where}: {json.dumps(address)[:60]} is not a \"host:port\" string")
    host, sep, port = address.rpartition(":")
    if not sep or not _HOST.fullmatch(host) or not re.fullmatch(r"[0-9]{1,5}", port) or not 1 <= int(port) <= 65535:
        raise UsageError(f"TF_CONFIG {where}: {address[:60]!r} is not host:port with a port in 1..65535")


def validate_tf_config(raw: str | None) -> dict:
    """Parse TF_CONFIG for multi_worker; one-line UsageError when missing or malformed.

    Checked strictly, as the launchers write it: `cluster` maps job names (worker, chief) to lists
    of "host:port" strings (at most one chief), `task` has `type` one of those jobs and `index` an
    integer (not a string or a bool) into its list."""
    expected = ('{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": I}} '
                "(launch/local.sh writes it for you)")
    if not raw:
        raise UsageError(f"--strategy=multi_worker needs TF_CONFIG; set it to {expected}")
    try:
        spec = json.loads(raw)
    except (ValueError, RecursionError):
        spec = None
    cluster_spec = spec.get("cluster") if isinstance(spec, dict) else None
    task = spec.get("task") if isinstance(spec, dict) else None
    if not isinstance(cluster_spec, dict) or not isinstance(task, dict) or "worker" not in cluster_spec:
        raise UsageError(f"TF_CONFIG is malformed: expected {expected}")
    refuse_other_tasks(spec)
    for job, addresses in cluster_spec.items():
        if not isinstance(addresses, list):
            raise UsageError(f"TF_CONFIG cluster.{job} is not a list of \"host:port\" strings")
        for i, address in enumerate(addresses):
            check_address(address, f"cluster.{job}[{i}]")
    if len(cluster_spec.get("chief", [])) > 1:
        raise UsageError("TF_CONFIG cluster.chief lists more than one task; expected at most one chief")
    task_type, index = task.get("type"), task.get("index")
    if task_type not in cluster_spec:
        raise UsageError(f"TF_CONFIG task.type {json.dumps(task_type)[:40]} is not a job of cluster "
                         f"({', '.join(sorted(cluster_spec))}); TF_CONFIG is malformed")
    if type(index) is not int or not 0 <= index < len(cluster_spec[task_type]):
        raise UsageError(f"TF_CONFIG task.index {json.dumps(index)[:40]} is not an integer in "
                         f"0..{len(cluster_spec[task_type]) - 1} (cluster.{task_type}); TF_CONFIG is malformed")
    addresses = [a for job in TASK_TYPES for a in cluster_spec.get(job, [])]
    if len(set(addresses)) != len(addresses):
        raise UsageError("TF_CONFIG lists the same host:port for two tasks; each task needs its own port")
    if len(addresses) < 2:
        raise UsageError("--strategy=multi_worker needs at least 2 tasks in TF_CONFIG; use "
                         "--strategy=mirrored on one host")
    return spec


def create_strategy(config: Config) -> tf.distribute.Strategy:
    """Build the strategy named by `config.strategy`."""
    if config.strategy == "multi_worker":
        resolver = None
        if cluster.cluster_source(config.cluster, os.environ) == "slurm":
            resolver = cluster.slurm_resolver(os.environ)
            workers = resolver.cluster_spec().as_dict().get("worker", [])
            if len(workers) < 2:
                raise UsageError("--strategy=multi_worker under Slurm needs at least 2 tasks "
                                 "(srun --ntasks >= 2); use --strategy=mirrored on one node")
            names, addresses = [f"worker {i}" for i in range(len(workers))], list(workers)
            index = resolver.task_id
        else:
            names, addresses, index = cluster.tasks(validate_tf_config(os.environ.get("TF_CONFIG")))
        options = tf.distribute.experimental.CommunicationOptions(
            implementation={"auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
                            "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL,
                            "ring": tf.distribute.experimental.CommunicationImplementation.RING
                            }[config.all_reduce],
            timeout_seconds=config.collective_timeout)
        # Bounded and interruptible (see startup.py): peers first, then TensorFlow's blocking part.
        previous_handlers = startup.handlers()
        startup.block_stop_signals()
        seconds_left = startup.rendezvous(names, addresses, index, config.startup_timeout)
        with startup.watch_creation(names, addresses, index, seconds_left):
            strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver,
                                                                 communication_options=options)
        startup.after_creation(previous_handlers)
        return strategy
    raw = os.environ.get("TF_CONFIG")
    if raw is not None and not raw.strip():
        del os.environ["TF_CONFIG"]  # TensorFlow would fail to parse an empty TF_CONFIG.
    elif raw is not None:
        try:
            spec = json.loads(raw)
        except ValueError:
            raise UsageError("TF_CONFIG is not valid JSON; unset it for single-host strategies") from None
        refuse_other_tasks(spec)
    configure_devices(config.cpu_replicas if config.strategy == "mirrored" else 1)
    gpus = _local_gpus(config.num_gpus)
    if config.strategy == "one_device":
        return tf.distribute.OneDeviceStrategy(gpus[0] if gpus else "/cpu:0")
    if gpus:
        devices = gpus
    else:
        devices = [d.name for d in tf.config.list_logical_devices("CPU")][:config.cpu_replicas]
    return tf.distribute.MirroredStrategy(
        devices=devices, cross_device_ops=_mirrored_cross_device_ops(config.all_reduce, bool(gpus)))


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True on the one task that writes summaries, logs and summary.json."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type == "chief" or (task_type == "worker" and task_id == 0 and
                                     "chief" not in resolver.cluster_spec().as_dict())


def device_kind(strategy: tf.distribute.Strategy) -> str:
    """'gpu' when the strategy's replicas are GPUs, else 'cpu'."""
    devices = strategy.extended.worker_devices
    return "gpu" if any("GPU" in d.upper() for d in devices) else "cpu"
