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


def test_readme_library_quick_start_runs_and_its_faithfulness_follows_spec_5_1(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    if not (dictionary_cache("smollm2-135m") / "resid_29" / "ae.pt").exists():
        pytest.skip("default SmolLM2 dictionaries are not built: run `sfc dictionaries build --model smollm2-135m`")
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    start = readme.index("## Quick start (library)")
    code = re.search(r"```python\n(.*?)```", readme[start:], re.S).group(1)
    code = code.replace("n_train=32, n_test=40", "n_train=4, n_test=4").replace("steps=10", "steps=2")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own example
    res = scope["result"]
    assert res["faithfulness"] == pytest.approx(
        (res["m_circuit"] - res["m_empty"]) / (res["m_full"] - res["m_empty"]))
    assert (tmp_path / "circuit.html").exists() and (tmp_path / "circuit.json").exists()
