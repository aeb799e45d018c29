"""User commands on a training run: evaluate, export, predict, plot (and saved_run, which reopens a
run from its flags.txt). They use the training library; the library never imports them. Each is
`python -m convmixer_dist.commands.NAME` with the entry shape of `flags.run_command`."""
