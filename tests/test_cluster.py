"""Cluster sources for multi_worker: TF_CONFIG and Slurm's environment (faked)."""

import pytest

from convmixer_dist import cluster

SLURM_ENV = {"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "node[1-2]",
             "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_JOB_NUM_NODES": "2"}


@pytest.mark.parametrize("requested,env,expected", [
    ("auto", SLURM_ENV, "slurm"),
    ("auto", {**SLURM_ENV, "TF_CONFIG": "{}"}, "tf_config"),
    ("auto", {}, "tf_config"),
    ("slurm", {}, "slurm"),
    ("tf_config", SLURM_ENV, "tf_config"),
])
def test_cluster_source(requested, env, expected):
    assert cluster.cluster_source(requested, env) == expected


def test_slurm_environment_gives_the_expected_cluster_spec(monkeypatch):
    for key, value in SLURM_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_GPUS_ON_NODE", raising=False)
    resolver = cluster.slurm_resolver(dict(SLURM_ENV), port_base=9100)
    assert resolver.cluster_spec().as_dict() == {"worker": ["node1:9100", "node2:9100"]}
    assert (resolver.task_type, resolver.task_id) == ("worker", 1)


def test_slurm_gpus_per_node_comes_from_the_allocation():
    assert cluster.slurm_gpus_per_node({"SLURM_GPUS_ON_NODE": "4"}) == 4


def test_cpu_only_slurm_nodes_get_no_accelerators_even_with_two_tasks_per_node(monkeypatch):
    env = {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NODELIST": "cpu[1-2]",
           "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_NUM_NODES": "2"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(cluster.shutil, "which", lambda name: None)  # no nvidia-smi: a CPU node
    resolver = cluster.slurm_resolver(env, port_base=9200)
    assert resolver.cluster_spec().as_dict() == {
        "worker": ["cpu1:9200", "cpu1:9201", "cpu2:9200", "cpu2:9201"]}
    assert (resolver.task_type, resolver.task_id) == ("worker", 3)
    assert not resolver.num_accelerators()
