"""Feature labels: automatic ones read off a dashboard, and human ones a person wrote.

**Automatic labels.** :func:`auto_label` turns a feature's dashboard (see
:mod:`viz.dashboards`) into a few words: the tokens on which the feature fires
hardest in its top-activating contexts, then (after an arrow) the tokens whose
logits its decoder direction raises most::

    "are · were → is, was"

read as "fires on *are* and *were*; promotes *is* and *was*". Tokens are
stripped of surrounding spaces; a token that is only white space shows as
``␣`` (space) or ``↵`` (new line). A feature that never fires in the corpus
is labelled ``"(inactive on corpus) → …"``. The label is a hint, not an
explanation: it is built from two token lists and nothing else.

**Human labels.** Kept in a circuit file as ``metadata.extra["labels"]``
(``{"site/feature": "label"}``, see ``docs/circuit-format.md``), and in a
node's own ``label`` field when a file was written by hand. The viewer lets a
person overwrite any label and downloads them in the feature-flags file
(:mod:`circuits.flags`); :func:`read_labels_file` reads that file back, and
:func:`set_labels` stores its labels in the circuit. A human label always wins
over the automatic one. Automatic labels are kept apart, in
``metadata.extra["auto_labels"]``, so that they never pass for human ones.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

LABELS_FIELD = "labels"  # metadata.extra[LABELS_FIELD]: human labels by feature key
AUTO_LABELS_FIELD = "auto_labels"  # metadata.extra[AUTO_LABELS_FIELD]: automatic labels by feature key
MAX_TOKENS_EACH = 2  # tokens named from each side of the arrow
INACTIVE = "(inactive on corpus)"


def _show(token: str) -> str:
    text = token.strip()
    if text:
        return text
    return "↵" if "\n" in token else "␣"


def _firing_tokens(dashboard: Mapping[str, Any], k: int) -> list[str]:
    """The ``k`` tokens with the largest summed activation at the peak of each context."""
    score: dict[str, float] = {}
    for ctx in dashboard.get("contexts") or []:
        acts = list(ctx.get("acts") or [])
        tokens = list(ctx.get("tokens") or [])
        if not acts or len(acts) != len(tokens):
            continue
        j = max(range(len(acts)), key=lambda i: acts[i])
        if acts[j] <= 0:
            continue
        tok = _show(str(tokens[j]))
        score[tok] = score.get(tok, 0.0) + float(acts[j])
    return [t for t, _ in sorted(score.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


def _promoted_tokens(dashboard: Mapping[str, Any], k: int) -> list[str]:
    out: list[str] = []
    for item in dashboard.get("promoted") or []:
        tok = _show(str(item.get("token", "")))
        if tok not in out:
            out.append(tok)
        if len(out) == k:
            break
    return out


def auto_label(dashboard: Mapping[str, Any], k: int = MAX_TOKENS_EACH) -> str:
    """A short label for one feature from its dashboard (see the module docstring).

    Never empty: a dashboard with no contexts and no promoted tokens gives
    ``"(inactive on corpus)"``.
    """
    fires = _firing_tokens(dashboard, k)
    promotes = _promoted_tokens(dashboard, k)
    left = " · ".join(fires) if fires else INACTIVE
    return f"{left} → {', '.join(promotes)}" if promotes else left


def auto_labels(dashboards: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """:func:`auto_label` of every dashboard, by feature key."""
    return {key: auto_label(dash) for key, dash in dashboards.items()}


def human_labels(circuit: Any) -> dict[str, str]:
    """The human labels of a circuit (dict or ``Circuit``), by feature key: node ``label`` fields,
    overridden by ``metadata.extra["labels"]``. Empty labels are left out."""
    from viz.figure import load_circuit

    return labels_of_document(load_circuit(circuit))


def labels_of_document(data: Mapping[str, Any]) -> dict[str, str]:
    """:func:`human_labels` of a circuit document that has already been validated."""
    from viz.figure import feature_key

    out = {k: n["label"] for n in data["nodes"] if (k := feature_key(n)) and n.get("label")}
    extra = (data["metadata"].get("extra") or {}).get(LABELS_FIELD) or {}
    out.update({k: v for k, v in extra.items() if isinstance(v, str) and v.strip()})
    return out


def read_labels_file(path: str | os.PathLike, feature_keys: Iterable[str], model: str | None = None) -> dict[str, str]:
    """The labels of a feature-flags file (as the viewer downloads it), checked against a circuit.

    Raises ``ValueError`` naming every label key that is not a feature of the
    circuit (a file made for another circuit), or a file made for another model.
    Empty labels are left out.
    """
    from circuits.flags import load_flags

    flags = load_flags(path)
    if model is not None and flags.model is not None and flags.model != model:
        raise ValueError(
            f"{path} holds labels for model {flags.model!r}, but this circuit is of {model!r}: "
            "give the labels file downloaded from this circuit's page."
        )
    known = set(feature_keys)
    unknown = sorted(k for k in flags.labels if k not in known)
    if unknown:
        shown = ", ".join(unknown[:20]) + (f" and {len(unknown) - 20} more" if len(unknown) > 20 else "")
        raise ValueError(
            f"{path} labels {len(unknown)} feature(s) that are not in this circuit ({shown}): "
            "give the labels file downloaded from this circuit's page."
        )
    return {k: v.strip() for k, v in flags.labels.items() if v.strip()}


def set_labels(circuit: Any, labels: Mapping[str, str]) -> None:
    """Store human ``labels`` in ``circuit.metadata.extra["labels"]`` (merged over those there)."""
    extra = circuit.metadata.extra
    merged = dict(extra.get(LABELS_FIELD) or {})
    merged.update(labels)
    extra[LABELS_FIELD] = dict(sorted(merged.items()))


def attach_dashboards(circuit: Any, dashboards: Mapping[str, Any]) -> None:
    """Give ``circuit`` (a ``Circuit``) its ``dashboards`` and their automatic labels
    (``metadata.extra["auto_labels"]``), merged over any it has."""
    circuit.dashboards = dict(circuit.dashboards or {}) | dict(dashboards)
    autos = dict(circuit.metadata.extra.get(AUTO_LABELS_FIELD) or {})
    autos.update(auto_labels(dashboards))
    circuit.metadata.extra[AUTO_LABELS_FIELD] = dict(sorted(autos.items()))


__all__ = ["AUTO_LABELS_FIELD", "LABELS_FIELD", "attach_dashboards", "auto_label", "auto_labels", "human_labels",
           "read_labels_file", "set_labels"]
