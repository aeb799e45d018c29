"""Cross-replica collectives of a traced training step, read from the graph.

`per_step(train_loop_concrete_function, local_replicas)` counts the all-reduce (and gather) ops that
one step of `training.steps.make_train_loop` executes, with their elements and bytes: the number
the scaling benchmark reports and the tests pin (one gradient collective per bucket plus one small
bookkeeping collective per step). It needs a strategy whose reductions are collective ops:
MultiWorkerMirroredStrategy, or MirroredStrategy with collective cross-device ops (on CPU the
default mirrored path copies to one device instead, which has no collective op to count).
"""
from __future__ import annotations

import dataclasses
import re

import tensorflow as tf

from convmixer_dist.optimization import GRADIENT_SCOPE

COLLECTIVE_OPS = frozenset({"CollectiveReduce", "CollectiveReduceV2", "CollectiveReduceV3",
                            "CollectiveGather", "CollectiveGatherV2", "NcclAllReduce"})
@dataclasses.dataclass(frozen=True)
class Collective:
    op: str
    dtype: str
    elements: int  # -1 when the shape is not static
    name: str

    @property
    def bytes(self) -> int:
        return self.elements * tf.as_dtype(self.dtype).size if self.elements >= 0 else -1


def collective_ops(graph) -> list[Collective]:
    """Every collective op of `graph` and of the functions its ops call (loop bodies, branches,
    nested tf.functions), each function visited once, in graph order."""
    found: list[Collective] = []
    seen: set[str] = set()

    def visit(g) -> None:
        for op in g.get_operations():
            if op.type in COLLECTIVE_OPS:
                shape = op.inputs[0].shape
                elements = shape.num_elements() if shape.is_fully_defined() else -1
                found.append(Collective(op.type, op.inputs[0].dtype.name, elements, op.name))
            for attr in op.node_def.attr.values():
                names = [attr.func.name] if attr.HasField("func") else [
                    f.name for f in attr.list.func]
                for name in names:
                    function = g._get_function(name) if name and name not in seen else None  # noqa: SLF001
                    if function is not None and hasattr(function, "graph"):
                        seen.add(name)
                        visit(function.graph)

    visit(graph)
    return found


def is_gradient(collective: Collective) -> bool:
    """A collective of the gradient path: under `GRADIENT_SCOPE` (TensorFlow numbers repeated name
    scopes `gradient_allreduce_1`, `_2`, ...)."""
    return any(re.fullmatch(rf"{GRADIENT_SCOPE}(_\d+)?", part) for part in collective.name.split("/"))


def per_step(concrete_function, local_replicas: int = 1) -> dict:
    """Collectives per optimizer step of a traced train loop (which holds nothing but its step loop):
    each local replica issues its own op of every collective, so the ops are divided by
    `local_replicas`. `gradient_*` counts the gradient's own (named by `optimization.GRADIENT_SCOPE`)."""
    ops = collective_ops(concrete_function.graph)
    if len(ops) % local_replicas:
        raise ValueError(f"{len(ops)} collective ops do not divide among {local_replicas} replicas")
    gradient = [c for c in ops if is_gradient(c)]
    return {"collectives": len(ops) // local_replicas,
            "gradient_collectives": len(gradient) // local_replicas,
            "elements": sum(c.elements for c in ops) // local_replicas,
            "bytes": sum(c.bytes for c in ops) // local_replicas,
            "gradient_bytes": sum(c.bytes for c in gradient) // local_replicas,
            "dtypes": sorted({c.dtype for c in gradient})}



def overlap(trace: dict) -> dict:
    """How the gradient's collectives lay against the backward pass, from `trace_viewer` events
    (`perf.profile_report.load_trace`) of a profile of one training step: the backward pass is the
    ops under the gradient tape, the collectives those under `GRADIENT_SCOPE`. With buckets the first
    collective starts before the backward pass ends (`lead_ms` > 0: the late layers' reduction runs
    while the early layers' gradients are still being computed); with one bucket it cannot."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]

    def long_name(event: dict) -> str:
        return event.get("args", {}).get("long_name", "")

    comm = [e for e in events if e.get("name") in COLLECTIVE_OPS
            and is_gradient(Collective(e["name"], "float32", -1, long_name(e).split(":")[0]))]
    backward = [e for e in events if "gradient_tape/" in long_name(e) and e not in comm]
    if not comm or not backward:
        return {"collectives": len(comm), "backward_ops": len(backward)}
    start = min(e["ts"] for e in backward)
    end = max(e["ts"] + e["dur"] for e in backward)
    inside = sum(max(0.0, min(e["ts"] + e["dur"], end) - max(e["ts"], start)) for e in comm)
    return {"collectives": len(comm), "backward_ops": len(backward),
            "backward_ms": (end - start) / 1e3,
            "lead_ms": (end - min(e["ts"] for e in comm)) / 1e3,
            "collective_ms_inside_backward": inside / 1e3}
