"""Where a multi-worker cluster comes from: TF_CONFIG (launch/local.sh, launch/ssh.sh, Kubeflow's
TFJob) or Slurm's environment under `srun` (launch/slurm.sbatch).

Pure functions over an environment mapping; nothing here runs a TensorFlow op, because
MultiWorkerMirroredStrategy must be created before any other op.
"""
from __future__ import annotations

import shutil
from typing import Mapping

SLURM_VARIABLES = ("SLURM_PROCID", "SLURM_STEP_NODELIST")


def tasks(tf_config: dict) -> tuple[list[str], list[str], int]:
    """The tasks that join MultiWorkerMirroredStrategy (chief first, then workers) of a parsed
    TF_CONFIG: names ("worker 1"), "host:port" addresses, and this task's position in them."""
    spec = tf_config["cluster"]
    names, addresses = [], []
    for job in ("chief", "worker"):
        for i, address in enumerate(spec.get(job, [])):
            names.append(f"{job} {i}")
            addresses.append(address)
    task = tf_config["task"]
    return names, addresses, names.index(f"{task['type']} {int(task['index'])}")


def cluster_source(requested: str, env: Mapping[str, str]) -> str:
    """`--cluster` -> "tf_config" or "slurm"; auto picks Slurm under srun when TF_CONFIG is unset."""
    if requested != "auto":
        return requested
    under_srun = all(env.get(name) for name in SLURM_VARIABLES)
    return "slurm" if under_srun and not env.get("TF_CONFIG") else "tf_config"


def slurm_gpus_per_node(env: Mapping[str, str]) -> int | None:
    """GPUs per node from Slurm's allocation (SLURM_GPUS_ON_NODE); 0 on a node without nvidia-smi
    (TensorFlow would otherwise crash running it); None lets TensorFlow ask nvidia-smi."""
    if env.get("SLURM_GPUS_ON_NODE", "").isdigit():
        return int(env["SLURM_GPUS_ON_NODE"])
    return None if shutil.which("nvidia-smi") else 0


def slurm_resolver(env: Mapping[str, str], port_base: int = 8888):
    """SlurmClusterResolver over this srun step: one worker per task, ports from `port_base`.

    It reads SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_STEP_NODELIST and SLURM_STEP_TASKS_PER_NODE,
    and sets CUDA_VISIBLE_DEVICES per task when the node has GPUs.
    """
    import tensorflow as tf  # Only here: creating the resolver runs no op.

    gpus = slurm_gpus_per_node(env)
    if gpus == 0:
        # SlurmClusterResolver cannot describe CPU-only nodes (it divides GPUs among tasks, and a
        # claimed GPU would make the strategy look for one): lay out hosts and ports with one fake
        # GPU slot per task, then hand the strategy the same cluster with no accelerators.
        probe = tf.distribute.cluster_resolver.SlurmClusterResolver(
            port_base=port_base, gpus_per_node=int(env.get("SLURM_STEP_NUM_TASKS", "1")),
            gpus_per_task=1, auto_set_gpu=False)
        return tf.distribute.cluster_resolver.SimpleClusterResolver(
            probe.cluster_spec(), task_type=probe.task_type, task_id=probe.task_id, rpc_layer="grpc",
            num_accelerators={})
    return tf.distribute.cluster_resolver.SlurmClusterResolver(port_base=port_base, gpus_per_node=gpus)
