"""Measure the cached SmolLM2 dictionary set against its targets; print one JSON object.

    python benchmarks/dictionaries.py [--build] [--tokens N] [--harvest-dtype float32|bfloat16]
                                      [--heldout N (default 8192)]

With ``--build`` the default scope is (re)built first and the build is timed
(run it on an empty ``$SFC_CACHE`` to time a first build). Then it times
loading the cached model plus dictionaries, and measures each site on
held-out text (see :func:`attribution.dictionaries.store.evaluate_dictionaries`).

Targets: variance explained >= 0.80 at every site; mean L0 <= 64; dead
fraction <= 0.10; CE loss recovered median >= 0.80 and worst >= 0.60; first
build <= 15 min and cached load <= 5 s on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Running this file puts benchmarks/ first on sys.path, where a sibling module
# may share the package's name (benchmarks/attribution.py); import the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", action="store_true", help="build the default scope first (timed)")
    parser.add_argument("--tokens", type=int, default=None, help="harvest tokens for --build")
    parser.add_argument("--harvest-dtype", choices=["float32", "bfloat16"], default=None,
                        help="dtype of the harvest for --build (default: bfloat16 where native)")
    parser.add_argument("--heldout", type=int, default=8192, help="held-out tokens for the report")
    args = parser.parse_args()

    result: dict = {"threads": torch.get_num_threads()}
    if args.build:
        cmd = [sys.executable, "-m", "sfc", "dictionaries", "build", "--model", "smollm2-135m"]
        if args.tokens:
            cmd += ["--tokens", str(args.tokens)]
        if args.harvest_dtype:
            cmd += ["--harvest-dtype", args.harvest_dtype]
        t0 = time.time()
        subprocess.run(cmd, check=True)
        result["build_seconds"] = round(time.time() - t0, 1)

    from attribution.cache import dictionary_cache
    from attribution.dictionaries.formats import read_metadata
    from attribution.dictionaries.store import evaluate_dictionaries, load_cached_dictionaries
    from attribution.model.embedded import DEFAULT_SITES, MODEL_NAME, load_smollm2

    t0 = time.time()
    model = load_smollm2()
    dictionaries = load_cached_dictionaries(MODEL_NAME, model=model)
    result["load_seconds"] = round(time.time() - t0, 2)
    metadata = {s: read_metadata(dictionary_cache(MODEL_NAME) / s) for s in DEFAULT_SITES}
    t0 = time.time()
    rows = evaluate_dictionaries(model, dictionaries, args.heldout, metadata=metadata)
    result["report_seconds"] = round(time.time() - t0, 1)
    ce = [r["ce_loss_recovered"] for r in rows]
    ve = [r["variance_explained"] for r in rows]
    dead = [r["dead_fraction"] for r in rows if r["dead_fraction"] is not None]
    result.update({
        "sites": rows,
        "tokens_trained": {s: m.get("tokens_trained") for s, m in metadata.items()},
        "train_fvu_refit": {s: (m.get("train") or {}).get("refit_fvu") for s, m in metadata.items()},
        "train_seconds": {s: (m.get("train") or {}).get("seconds") for s, m in metadata.items()},
        "harvest_dtype": sorted({str(m.get("harvest_dtype")) for m in metadata.values()}),
        "summary": {
            "variance_explained_min": min(ve),
            "sites_variance_explained_at_least_0.80": sum(v >= 0.80 for v in ve),
            "l0_mean": statistics.mean(r["l0"] for r in rows),
            "dead_fraction_max": max(dead) if dead else None,
            "ce_loss_recovered_median": statistics.median(ce),
            "ce_loss_recovered_min": min(ce),
        },
    })
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
