"""Circuits: tasks, the graph builder (thresholds, aggregation, pruning), node masks,
and the versioned circuit format with its networkx and Neuronpedia exports.

Public names are imported on first use, so that reading a circuit file (the
viewer) does not load the attribution engine.
"""

from attribution.lazy import lazy_exports

_EXPORTS = {
    "build_circuit": "circuits.build",
    "circuit_masks": "circuits.build",
    "Circuit": "circuits.graph",
    "CircuitFormatError": "circuits.graph",
    "CircuitMetadata": "circuits.graph",
    "Edge": "circuits.graph",
    "Node": "circuits.graph",
    "load_circuit": "circuits.graph",
    "NodeMask": "circuits.masks",
    "masks_from_effects": "circuits.masks",
    "TASKS": "circuits.tasks",
    "Example": "circuits.tasks",
    "TaskData": "circuits.tasks",
    "answer_ids": "circuits.tasks",
    "load_jsonl_task": "circuits.tasks",
    "load_task": "circuits.tasks",
    "make_task": "circuits.tasks",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports("circuits", _EXPORTS, globals())
