"""Dashboards and labels for a circuit, as the command line makes them.

``sfc discover`` (unless ``--no-dashboards``), ``sfc dashboards`` and ``sfc view
--dashboards auto`` share the options added by :func:`add_dashboard_arguments`
and the job :func:`dashboards_for`: the dashboard of every feature node of a
circuit (:func:`viz.dashboards.circuit_dashboards`, cached) and their automatic
labels (:func:`viz.labels.attach_dashboards`).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from viz.dashboards import DEFAULT_CORPUS_TOKENS, circuit_dashboards, read_corpus_file
from viz.labels import attach_dashboards

MIN_CONTEXTS = 5  # a dashboard "has contexts" with at least this many (the coverage measure)


def _corpus_file(value: str) -> str:
    """argparse type: a readable, non-empty text file (checked before any model work)."""
    try:
        read_corpus_file(value)
    except (ValueError, FileNotFoundError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {value!r}")
    return n


def add_dashboard_arguments(p: argparse.ArgumentParser, *, switch: bool = False) -> None:
    """``--corpus`` and ``--dashboard-tokens`` (and ``--no-dashboards`` when ``switch``)."""
    if switch:
        p.add_argument("--no-dashboards", action="store_true",
                       help="do not compute feature dashboards and automatic labels for the page")
    p.add_argument("--corpus", type=_corpus_file, default=None, metavar="TEXTFILE",
                   help="plain-text file to find top-activating contexts in (paragraphs separated by blank "
                        "lines; default: the model's own corpus)")
    p.add_argument("--dashboard-tokens", type=_positive, default=DEFAULT_CORPUS_TOKENS, metavar="N",
                   help=f"corpus tokens to read for dashboards (default {DEFAULT_CORPUS_TOKENS})")


def coverage(dashboards: Mapping[str, Any], keys: list[str], labels: Mapping[str, str]) -> dict[str, Any]:
    """How many of the feature ``keys`` have a dashboard of >= MIN_CONTEXTS contexts and a label."""
    n = len(keys)
    full = sum(1 for k in keys if len((dashboards.get(k) or {}).get("contexts") or []) >= MIN_CONTEXTS)
    named = sum(1 for k in keys if (labels.get(k) or "").strip())
    return {"features": n, f"with_{MIN_CONTEXTS}_contexts": full, "labelled": named,
            f"frac_with_{MIN_CONTEXTS}_contexts": round(full / n, 4) if n else None,
            "frac_labelled": round(named / n, 4) if n else None}


def dashboards_for(circuit: Any, model: Any, dictionaries: Mapping[str, Any], args: argparse.Namespace,
                   metrics: dict | None = None) -> dict:
    """Compute the dashboards of ``circuit``'s feature nodes, attach them and their automatic
    labels to it (a ``Circuit``), and record time and coverage in ``metrics`` if given."""
    from viz.dashboards import circuit_feature_keys
    from viz.labels import AUTO_LABELS_FIELD, human_labels

    t0 = time.perf_counter()
    corpus = Path(args.corpus) if getattr(args, "corpus", None) else None
    dash = circuit_dashboards(model, dictionaries, circuit, n_tokens=args.dashboard_tokens, corpus=corpus)
    attach_dashboards(circuit, dash)
    if metrics is not None:
        keys = circuit_feature_keys(circuit)
        labels = dict(circuit.metadata.extra.get(AUTO_LABELS_FIELD) or {}) | human_labels(circuit)
        metrics.setdefault("timings", {})["dashboards_s"] = round(time.perf_counter() - t0, 2)
        metrics["dashboards"] = coverage(dash, keys, labels) | {
            "corpus": str(corpus) if corpus else "model corpus", "corpus_tokens": args.dashboard_tokens}
    return dash


__all__ = ["add_dashboard_arguments", "coverage", "dashboards_for"]
