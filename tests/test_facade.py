"""The front door: ``import sfc`` is lazy, every facade name resolves, docs/api.md lists
exactly the facade, and the feature flags file follows its schema."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import sfc
from circuits.flags import FlagsFileError, flags_from_document, load_flags

ROOT = Path(__file__).resolve().parent.parent


def test_every_facade_name_resolves_to_the_object_of_its_module():
    import importlib

    for name in sfc.__all__:
        assert getattr(sfc, name) is getattr(importlib.import_module(sfc._EXPORTS[name]), name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sfc.nope  # noqa: B018


def test_import_sfc_loads_neither_torch_nor_nnsight():
    code = "import sys, sfc; print(sorted(m for m in ('torch', 'nnsight', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_api_doc_lists_exactly_the_facade():
    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([A-Za-z_]+)` \|", text, flags=re.M)
    assert sorted(rows) == sorted(sfc.__all__)
    headings = re.findall(r"^### `([A-Za-z_]+)`", text, flags=re.M)
    assert sorted(headings) == sorted(sfc.__all__)


VIEWER_DOC = {
    "format": "sfc-feature-flags", "version": 1, "model": "smollm2-135m", "task": "across_rc",
    "dictionaries": {"resid_3": "cache:smollm2-135m/resid_3"},
    "labels": {"resid_3/17": "she / her"}, "flagged": ["resid_3/17", "resid_3/4", "resid_6/2"],
}


def test_a_viewer_flags_document_reads_as_flagged_features_by_site():
    flags = flags_from_document(VIEWER_DOC)
    assert flags.flagged == {"resid_3": [4, 17], "resid_6": [2]}
    assert flags.labels == {"resid_3/17": "she / her"} and flags.model == "smollm2-135m"
    assert len(flags) == 3
    flags.check({"resid_3": 32, "resid_6": 32}, model="smollm2-135m",
                dictionary_ids={"resid_3": "cache:smollm2-135m/resid_3"})


def test_flags_in_a_json_list_or_csv_read_the_same(tmp_path):
    (tmp_path / "f.json").write_text(json.dumps(VIEWER_DOC["flagged"]))
    (tmp_path / "f.csv").write_text("site,feature\nresid_3,17\nresid_3,4\nresid_6,2\n")
    expected = {"resid_3": [4, 17], "resid_6": [2]}
    assert load_flags(tmp_path / "f.json").flagged == expected
    assert load_flags(tmp_path / "f.csv").flagged == expected


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"format": "sfc-feature-flags", "version": 1}, "does not follow the flags schema"),
        ({"format": "sfc-feature-flags", "version": 1, "flagged": ["resid_3:17"]}, "does not follow the flags schema"),
        ({"format": "sfc-feature-flags", "version": 9, "flagged": []}, "newer than this toolkit reads"),
        ({"nodes": []}, "is not a feature flags file"),
        (["resid_3"], "is not a feature key"),
    ],
)
def test_malformed_flags_documents_are_refused_with_one_sentence(doc, message):
    with pytest.raises(FlagsFileError, match=message):
        flags_from_document(doc)


def test_flags_that_do_not_fit_the_dictionaries_are_refused():
    flags = flags_from_document(VIEWER_DOC)
    with pytest.raises(FlagsFileError, match=r"site\(s\) \['resid_6'\] that have no dictionary"):
        flags.check({"resid_3": 32})
    with pytest.raises(FlagsFileError, match="has only 8 features"):
        flags.check({"resid_3": 8, "resid_6": 32})
    with pytest.raises(FlagsFileError, match="of model 'smollm2-135m', not 'gpt2'"):
        flags.check({"resid_3": 32, "resid_6": 32}, model="gpt2")
    with pytest.raises(FlagsFileError, match="was made with dictionary"):
        flags.check({"resid_3": 32, "resid_6": 32}, dictionary_ids={"resid_3": "/elsewhere/resid_3"})


def test_unreadable_flags_files_say_what_is_wrong(tmp_path):
    with pytest.raises(FlagsFileError, match="No flags file at"):
        load_flags(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(FlagsFileError, match="is not valid JSON"):
        load_flags(tmp_path / "bad.json")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(FlagsFileError, match="'site' and 'feature' columns"):
        load_flags(tmp_path / "bad.csv")
