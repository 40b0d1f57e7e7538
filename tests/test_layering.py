"""The layout's import rules hold: packages import one way along the pipeline, and no
module imports itself through a cycle (checked on the real import graph with grimp)."""

from __future__ import annotations

import grimp
import networkx as nx
import pytest

# Highest first: a package may import only the packages below it.
LAYERS = ["sfc", "viz", "ablation", "circuits", "attribution"]


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(*LAYERS, cache_dir=None)


def _chains(illegal) -> list[str]:
    return [" -> ".join((*sorted(r.heads), *r.middle, *sorted(r.tails))) for dep in illegal for r in dep.routes]


def test_packages_import_only_the_packages_below_them(graph):
    illegal = graph.find_illegal_dependencies_for_layers(layers=LAYERS, containers=set())
    assert not illegal, "imports against the pipeline order:\n" + "\n".join(_chains(illegal))


def test_the_layer_check_catches_an_upward_import(graph):
    graph = grimp.build_graph(*LAYERS, cache_dir=None)
    graph.add_import(importer="circuits.graph", imported="viz.html")
    illegal = graph.find_illegal_dependencies_for_layers(layers=LAYERS, containers=set())
    assert any("circuits.graph -> viz.html" in c for c in _chains(illegal))


def _cycles(graph) -> list[list[str]]:
    g = nx.DiGraph()
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            g.add_edge(module, imported)
    return list(nx.simple_cycles(g, length_bound=8))


def test_no_module_is_part_of_an_import_cycle(graph):
    cycles = _cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c + [c[0]]) for c in cycles[:5])


def test_the_cycle_check_catches_a_cycle(graph):
    graph = grimp.build_graph(*LAYERS, cache_dir=None)
    graph.add_import(importer="attribution.model.wrapper", imported="attribution.model.loading")
    assert any(set(c) == {"attribution.model.wrapper", "attribution.model.loading"} for c in _cycles(graph))
