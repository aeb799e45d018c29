"""The performance tools' one timing loop: warm-up calls are not timed, timed calls alternate."""
from convmixer_dist.perf.timing import time_alternating, time_calls


def test_warmup_calls_are_untimed_and_runs_alternate():
    calls = []
    seconds = time_alternating({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                               warmup=1, repeats=3, progress=False)
    assert calls == ["a", "b"] * 4
    assert [len(v) for v in seconds.values()] == [3, 3] and all(s >= 0 for s in seconds["a"])


def test_time_calls_prints_one_line_per_timed_call_with_a_label(capsys):
    calls = []
    assert len(time_calls(lambda: calls.append(1), warmup=2, repeats=3, label="run")) == 3
    assert len(calls) == 5
    assert capsys.readouterr().out.count("  run: window ") == 3
    time_calls(lambda: None, warmup=0, repeats=2)
    assert capsys.readouterr().out == ""
