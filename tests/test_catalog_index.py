"""The catalog's index page in headless Chromium: search and sort against Python's answers."""

from __future__ import annotations

from pathlib import Path

from tests.test_viewer import browser  # noqa: F401  (the Chromium fixture)
from viz.catalog import render_catalog_index


def _catalog() -> dict:
    clusters = []
    for cid, (size, own, word) in enumerate([(9, 0.1, " apple"), (5, 0.7, " pear"), (7, None, " plum"),
                                             (3, 0.4, "<script>x</script>")]):
        clusters.append({"id": cid, "size": size, "members": list(range(size)), "faithfulness_own": own,
                         "faithfulness_other": 0.2, "ratio": None if own is None else own / 0.2,
                         "circuit": f"clusters/{cid:03d}/circuit.json", "page": f"clusters/{cid:03d}/circuit.html",
                         "n_nodes": 3, "n_edges": 2, "top_features": [{"id": f"resid_3/{cid}", "effect": 0.5}],
                         "examples": [{"id": 0, "context": ["the", word], "answer": " is", "loss_bits": 0.01,
                                       "truncated": False}]})
    return {"format": "sfc-catalog", "version": 1, "summary": {"n_samples": 24, "n_clusters": 4},
            "settings": {"model": "tiny"}, "clusters": clusters}


def test_index_search_and_sort(tmp_path: Path, browser):  # noqa: F811
    cat = _catalog()
    path = render_catalog_index(cat, tmp_path / "index.html")
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.resolve().as_uri())
    ids = lambda: [int(x) for x in page.eval_on_selector_all(".cluster", "els => els.map(e => e.dataset.id)")]  # noqa: E731
    by_size = [c["id"] for c in sorted(cat["clusters"], key=lambda c: -c["size"])]
    assert ids() == by_size
    page.select_option("#sort", "faithfulness_own")
    own = [c["id"] for c in sorted(cat["clusters"], key=lambda c: -(c["faithfulness_own"] if c["faithfulness_own"]
                                                                    is not None else float("-inf")))]
    assert ids() == own
    page.fill("#search", "pear")
    assert ids() == [1]
    page.fill("#search", "resid_3/2")
    assert ids() == [2]
    page.fill("#search", "")
    assert len(ids()) == 4
    assert page.locator(".ans").first.text_content() == " is"  # the answer token is highlighted
    assert page.locator(".ctx script").count() == 0  # a token is text, never markup
    assert "<script>x</script>" in page.locator(".cluster[data-id='3'] .ctx").text_content()
    assert not errors
    page.close()
