"""Train a ConvMixer under a tf.distribute strategy.

Single host:
  python -m convmixer_dist.main --strategy=mirrored --cpu_replicas=2 --flagfile=configs/quickstart.flags
  python -m convmixer_dist.main --strategy=mirrored --flagfile=configs/cifar10_convmixer256_8.flags \
      --data_dir=/data/cifar10
Multi-node (see launch/ and README "Multi-node"): the same command with --strategy=multi_worker on
every node, TF_CONFIG set per node (launch/local.sh, launch/ssh.sh, launch/slurm.sbatch, launch/k8s/).
"""
from __future__ import annotations

import os
import sys
import types

from absl import flags

from convmixer_dist import flags as cli
from convmixer_dist import rundir

EXIT_DIVERGED = 3  # Non-finite loss/weights; the last good checkpoint is kept.
EXIT_PREEMPTED = 75  # SIGTERM/SIGUSR1: checkpoint saved, rerun to resume (EX_TEMPFAIL).


def define_flags() -> None:
    """`--help` lists the training flags, not only absl's own."""
    flags.adopt_module_key_flags(cli)


def main(args: list[str], opts: types.SimpleNamespace) -> dict:
    """Parse flags into a Config, create the strategy, train and evaluate; returns the summary."""
    del args, opts  # Positional arguments are ignored, as absl's app.run always did here.
    config = cli.config_from_flags()
    # TensorFlow loads only after the flags are valid; strategy first, because
    # MultiWorkerMirroredStrategy must exist before any other TensorFlow op.
    if config.strategy == "multi_worker":  # Before TensorFlow's import; see startup.py.
        from convmixer_dist import startup
        startup.block_stop_signals()
    from convmixer_dist.runtime import quiet_tensorflow_import
    quiet_tensorflow_import()
    from convmixer_dist import strategy as strategy_lib
    from convmixer_dist import train

    strategy = strategy_lib.create_strategy(config)
    chief = strategy_lib.is_chief(strategy)
    try:
        summary = train.train_and_evaluate(config, strategy)
    except train.TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_DIVERGED)
    except train.Preempted as err:
        print(f"preempted: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_PREEMPTED)
    # Every worker states its final weights, so a multi-worker run can be checked for agreement.
    print(f"weights_sha256 {summary['weights_sha256']} weights_abs_sum {summary['weights_abs_sum']!r}",
          flush=True)
    if chief:
        rundir.write_json(os.path.join(config.model_dir, "summary.json"), summary)
        print(f"Done: eval accuracy {summary['eval_accuracy']:.4f}, {summary['steps']} steps; "
              f"summary in {os.path.join(config.model_dir, 'summary.json')}", flush=True)
    return summary


if __name__ == "__main__":
    cli.run_command(main, define_flags, training=True)
