"""The main job on the real embedded model (slow: needs the default dictionaries).

Run with ``python3 -m pytest -m slow`` after ``sfc dictionaries build --model smollm2-135m``.
"""

from __future__ import annotations

import json

import pytest

from attribution.cache import dictionary_cache
from sfc.cli import main as sfc_main

pytestmark = pytest.mark.slow


def test_discover_on_smollm2_writes_circuit_metrics_and_viewer(tmp_path):
    if not (dictionary_cache("smollm2-135m") / "resid_29" / "ae.pt").exists():
        pytest.skip("default SmolLM2 dictionaries are not built: run `sfc dictionaries build --model smollm2-135m`")
    out = tmp_path / "run"
    assert sfc_main(["discover", "--task", "across_pp", "--examples", "8", "--test", "8", "--steps", "2",
                     "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task_accuracy_test"] > 0.5  # the model does the task, so the circuit means something
    ev = metrics["evaluation"]
    assert ev["m_full"] > ev["m_empty"]
    assert metrics["faithfulness"] == pytest.approx((ev["m_circuit"] - ev["m_empty"]) / (ev["m_full"] - ev["m_empty"]))
    assert (out / "circuit.html").stat().st_size > 1e6  # plotly.js is inlined: the page works offline
    assert sfc_main(["evaluate", str(out / "circuit.json"), "--json"]) == 0
