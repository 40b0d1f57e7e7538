"""Every tutorial script runs to completion, so the tutorials never rot.

Each ``tutorials/*.py`` (helper scripts named ``make_*`` excepted) runs as
``python tutorials/X.py`` from the repository root with ``SFC_TUTORIAL_QUICK=1``,
which tutorials honour by skipping their optional slow cells.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted(p for p in (ROOT / "tutorials").glob("*.py") if not p.name.startswith("make_"))


@pytest.mark.parametrize("script", TUTORIALS, ids=[p.name for p in TUTORIALS])
def test_tutorial_runs_to_completion(script: Path):
    env = {**os.environ, "SFC_TUTORIAL_QUICK": "1", "MPLBACKEND": "Agg"}
    done = subprocess.run(
        [sys.executable, str(script.relative_to(ROOT))], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, (
        f"{script.name} exited with {done.returncode}\n--- stdout (tail)\n{done.stdout[-3000:]}"
        f"\n--- stderr (tail)\n{done.stderr[-3000:]}"
    )
