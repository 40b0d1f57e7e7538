"""Import time of the facade against torch's (target: `import sfc` <= 1.5x `import torch`).

    python benchmarks/import_time.py            # prints JSON

Each import runs in a fresh interpreter, `-X importtime` off, best of N; `import sfc`
is lazy, so it is also timed with the first facade call that loads the engine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _time(code: str, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    repeats = int(os.environ.get("REPEATS", "5"))
    # Whole interpreter runs (start-up included), so that no difference of noisy times goes negative.
    base = _time("pass", repeats)
    torch_s = _time("import torch", repeats)
    sfc_s = _time("import sfc", repeats)
    engine_s = _time("import sfc; sfc.node_effects", repeats)
    print(json.dumps({
        "python_startup_s": round(base, 3),
        "import_torch_s": round(torch_s, 3),
        "import_sfc_s": round(sfc_s, 3),
        "import_sfc_over_torch": round(sfc_s / torch_s, 3),
        "import_sfc_and_engine_s": round(engine_s, 3),
        "engine_over_torch": round(engine_s / torch_s, 3),
        "target_import_sfc_over_torch": 1.5,
        "loadavg": open("/proc/loadavg").read().split()[:3],
    }, indent=2))


if __name__ == "__main__":
    main()
