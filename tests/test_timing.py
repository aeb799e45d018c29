"""The performance tools' one timing loop: warm-up calls are not timed, one line per timed call."""
from convmixer_dist.perf.timing import time_calls


def test_time_calls_skips_warmup_and_prints_one_line_per_timed_call_with_a_label(capsys):
    calls = []
    seconds = time_calls(lambda: calls.append(1), warmup=2, repeats=3, label="run")
    assert len(seconds) == 3 and all(s >= 0 for s in seconds) and len(calls) == 5
    assert capsys.readouterr().out.count("  run: window ") == 3
    time_calls(lambda: None, warmup=0, repeats=2)
    assert capsys.readouterr().out == ""
