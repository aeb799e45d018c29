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

from convmixer_dist import preemption

if __name__ == "__main__":
    # The command's first act: stop signals stay pending (until the stop-signal thread or the
    # multi-worker start-up takes them) in every thread created from here on. Importing the flags
    # module already starts one (numpy's BLAS pool), and a thread that does not block them would
    # take a SIGTERM to its default action: the process killed instead of exiting 75.
    preemption.block_signals()

from absl import flags  # noqa: E402

from convmixer_dist import flags as cli  # noqa: E402
from convmixer_dist import rundir  # noqa: E402
from convmixer_dist.errors import UsageError

EXIT_DIVERGED = 3  # Non-finite loss/weights; the last good checkpoint is kept.
EXIT_PREEMPTED = preemption.EXIT_PREEMPTED  # SIGTERM/SIGUSR1: checkpoint saved, rerun to resume.
EXIT_INTERRUPTED = preemption.EXIT_INTERRUPTED  # Ctrl-C: checkpoint saved, rerun to resume.


def define_flags() -> None:
    """`--help` lists the training flags, not only absl's own."""
    flags.adopt_module_key_flags(cli)


def main(args: list[str], opts: types.SimpleNamespace) -> dict:
    """Parse flags into a Config, create the strategy, train and evaluate; returns the summary."""
    del opts
    if args:  # e.g. `learning_rate=0.5` without `--` would otherwise be ignored
        raise UsageError(f"unexpected argument {args[0]!r}: flags are written --name=value")
    config = cli.config_from_flags()
    # Before TensorFlow's import (its threads inherit the mask): stop signals stay pending until the
    # stop-signal thread takes them (preemption.py); multi-worker start-up polls them (startup.py).
    # (Already done at the command's start; here for callers of main() in-process.)
    preemption.block_signals()
    # TensorFlow loads only after the flags are valid; strategy first, because
    # MultiWorkerMirroredStrategy must exist before any other TensorFlow op.
    from convmixer_dist.runtime import quiet_tensorflow_import
    quiet_tensorflow_import()
    from convmixer_dist import strategy as strategy_lib
    from convmixer_dist.training import loop

    strategy = strategy_lib.create_strategy(config)
    preemption.install_signal_thread()  # From here on a stop signal stops at the next step.
    chief = strategy_lib.is_chief(strategy)
    if chief and config.profiler_port:  # The server is the chief's; a taken port fails silently.
        from convmixer_dist.profiling import check_port_free
        check_port_free(config.profiler_port)
    try:
        summary = loop.train_and_evaluate(config, strategy)
    except loop.TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_DIVERGED)
    except preemption.Stopped as err:
        code = preemption.exit_code()  # 75 for SIGTERM/SIGUSR1, 130 for Ctrl-C
        print(f"{'interrupted' if code == EXIT_INTERRUPTED else 'preempted'}: {err}", file=sys.stderr,
              flush=True)
        sys.exit(code)
    # Every worker states its final weights, so a multi-worker run can be checked for agreement.
    print(f"weights_sha256 {summary['weights_sha256']} weights_abs_sum {summary['weights_abs_sum']!r}",
          flush=True)
    if chief:
        rundir.write_json(os.path.join(config.model_dir, "summary.json"), summary)
        print(f"Done: test accuracy {summary['test_accuracy']:.4f}, {summary['steps']} steps; "
              f"summary in {os.path.join(config.model_dir, 'summary.json')}", flush=True)
    return summary


if __name__ == "__main__":
    cli.run_command(main, define_flags, training=True)
