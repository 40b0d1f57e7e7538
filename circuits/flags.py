"""Feature flags: the features a person marked (for SHIFT) and the labels they wrote.

The circuit viewer and the SHIFT ranking page download the same JSON document,
``circuits/schema/flags.schema.json`` (see ``docs/feature-flags.md``)::

    {"format": "sfc-feature-flags", "version": 1, "model": "smollm2-135m",
     "dictionaries": {"resid_3": "cache:smollm2-135m/resid_3"},
     "labels": {"resid_3/17": "she / her"}, "flagged": ["resid_3/17"]}

:func:`load_flags` also reads a plain JSON list of ``"site/feature"`` keys, or a
CSV with ``site`` and ``feature`` columns. :meth:`FeatureFlags.check` checks the
flags against a model's dictionaries before any heavy work.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

FORMAT = "sfc-feature-flags"
VERSION = 1
SCHEMA_PATH = Path(__file__).parent / "schema" / "flags.schema.json"


class FlagsFileError(ValueError):
    """A flags file that cannot be read, does not follow the schema, or does not fit the dictionaries."""


@dataclass(frozen=True)
class FeatureFlags:
    """Flagged features (``site -> sorted feature indices``), labels, and where they came from."""

    flagged: dict[str, list[int]]
    labels: dict[str, str] = field(default_factory=dict)
    model: str | None = None
    dictionaries: dict[str, str] = field(default_factory=dict)
    source: str = "<memory>"

    @property
    def keys(self) -> list[str]:
        """The flagged features as ``"site/feature"`` keys."""
        return [f"{site}/{i}" for site, idx in self.flagged.items() for i in idx]

    def __len__(self) -> int:
        return sum(len(v) for v in self.flagged.values())

    def check(
        self,
        widths: Mapping[str, int],
        *,
        model: str | None = None,
        dictionary_ids: Mapping[str, str] | None = None,
    ) -> None:
        """Raise :class:`FlagsFileError` if a flagged site has no dictionary, a feature index
        is beyond its dictionary's width, or the file names another model or dictionary set."""
        if model is not None and self.model is not None and self.model != model:
            raise FlagsFileError(
                f"{self.source} flags features of model {self.model!r}, not {model!r}: "
                "flag features on a page made with this model."
            )
        unknown = sorted(s for s in self.flagged if s not in widths)
        if unknown:
            raise FlagsFileError(
                f"{self.source} flags features at site(s) {unknown} that have no dictionary here "
                f"(sites: {sorted(widths)}): flag features of these dictionaries."
            )
        for site, idx in self.flagged.items():
            bad = [i for i in idx if i >= widths[site]]
            if bad:
                raise FlagsFileError(
                    f"{self.source} flags feature(s) {bad[:5]} at site {site}, whose dictionary has only "
                    f"{widths[site]} features: the file was made for another dictionary set."
                )
        if dictionary_ids and self.dictionaries:
            differ = sorted(s for s in self.flagged if s in self.dictionaries and s in dictionary_ids
                            and self.dictionaries[s] != dictionary_ids[s])
            if differ:
                site = differ[0]
                raise FlagsFileError(
                    f"{self.source} was made with dictionary {self.dictionaries[site]!r} at {site}, but "
                    f"{dictionary_ids[site]!r} is loaded: flag features of the loaded dictionaries."
                )


@cache
def _schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def _parse_key(key: Any, source: str) -> tuple[str, int]:
    if isinstance(key, str) and "/" in key:
        site, _, feat = key.rpartition("/")
        if site and feat.isdigit():
            return site, int(feat)
    raise FlagsFileError(f"{source}: {key!r} is not a feature key; write 'site/feature', e.g. 'resid_3/17'.")


def _group(pairs: list[tuple[str, int]]) -> dict[str, list[int]]:
    out: dict[str, set[int]] = {}
    for site, feat in pairs:
        out.setdefault(site, set()).add(feat)
    return {site: sorted(v) for site, v in out.items()}


def flags_from_document(doc: Any, source: str = "<memory>") -> FeatureFlags:
    """Validate a parsed flags document (the schema, or a list of keys) and read it."""
    if isinstance(doc, list):
        return FeatureFlags(_group([_parse_key(k, source) for k in doc]), source=source)
    import jsonschema

    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise FlagsFileError(
            f"{source} is not a feature flags file: expected a JSON object with \"format\": \"{FORMAT}\" "
            "(as the viewer downloads), a JSON list of 'site/feature' keys, or a CSV with site,feature columns."
        )
    if isinstance(doc.get("version"), int) and doc["version"] > VERSION:
        raise FlagsFileError(
            f"{source} has flags format version {doc['version']}, newer than this toolkit reads ({VERSION}): "
            "upgrade sparse-feature-circuits."
        )
    try:
        jsonschema.validate(doc, _schema())
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "the top level"
        raise FlagsFileError(f"{source} does not follow the flags schema at {where}: {exc.message}.") from None
    pairs = [_parse_key(k, source) for k in doc["flagged"]]
    return FeatureFlags(
        _group(pairs), dict(doc.get("labels") or {}), doc.get("model"), dict(doc.get("dictionaries") or {}),
        source,
    )


def load_flags(path: str | os.PathLike) -> FeatureFlags:
    """Read a flags file: the viewer's JSON document, a JSON list of keys, or a CSV
    with ``site`` and ``feature`` columns. Raises :class:`FlagsFileError` with the fix."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FlagsFileError(f"No flags file at {path}: check the path.") from None
    except PermissionError:
        raise FlagsFileError(f"{path} cannot be read (permission denied): check its permissions.") from None
    except UnicodeDecodeError:
        raise FlagsFileError(f"{path} is not UTF-8 text: give the JSON the viewer downloads, or a CSV.") from None
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        if not rows or not {"site", "feature"} <= set(rows[0]):
            raise FlagsFileError(f"{path} needs a header with 'site' and 'feature' columns and at least one row.")
        pairs = []
        for n, row in enumerate(rows, start=2):
            if not str(row["feature"]).strip().isdigit():
                raise FlagsFileError(f"{path} line {n}: feature {row['feature']!r} is not a whole number.")
            pairs.append((row["site"].strip(), int(row["feature"])))
        return FeatureFlags(_group(pairs), source=source)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FlagsFileError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}).") from None
    return flags_from_document(doc, source)


__all__ = ["FeatureFlags", "FlagsFileError", "flags_from_document", "load_flags"]
