"""Build the offline training corpus ``attribution/dictionaries/data/corpus.jsonl.gz`` from two Debian packages.

Sources (human-written English, fetched with ``apt-get download``, never
installed; both in Debian main, so free to redistribute):

- ``debian-handbook`` 11.20220922 — *The Debian Administrator's Handbook*
  by Raphaël Hertzog and Roland Mas, GPL-2.0+ or CC-BY-SA-3.0. Modern
  expository prose; each paragraph of the en-US HTML edition (code listings
  dropped) is kept, and consecutive paragraphs of one page form a document.
- ``fortunes`` 1:1.99.1-7.3 — the BSD ``fortune`` cookie files (quotations,
  jokes, aphorisms, short stories, poems; public domain or freely
  redistributable, see the package's copyright file). Each cookie is a
  document; ``ascii-art`` and ``art`` are dropped.

Processing, all deterministic: whitespace normalised; documents with fewer
than 40 characters dropped; exact duplicates (case- and space-insensitive)
dropped; any document containing a sentence of the subject-verb agreement
templates (``"The athlete that the managers like does"``-style prefixes,
see :data:`LEAKAGE`) dropped; shuffled with ``random.Random(SEED)``; the last
:data:`HELD_OUT_DOCS` documents are the held-out split.

Run ``python scripts/build_corpus.py`` (needs ``apt-get`` and ``dpkg-deb``);
it prints the counts and writes the file atomically.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import re
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

SEED = 20250101
HELD_OUT_DOCS = 400
PACKAGES = {"debian-handbook": "11.20220922", "fortunes": "1:1.99.1-7.3"}
HANDBOOK_HTML = "usr/share/doc/debian-handbook/html/en-US"
FORTUNE_DIR = "usr/share/games/fortunes"
FORTUNE_SKIP = {"ascii-art", "art"}
# Prefix shapes of the agreement data sets (simple, nounpp, rc, within_rc): a
# determiner + noun followed by a relative clause or prepositional phrase and
# an agreeing verb. A corpus sentence matching one would leak the task.
LEAKAGE = re.compile(
    r"\bthe \w+s? (that|who) the \w+s? (like|likes|hate|hates|admire|admires) (is|are|has|have|does|do|goes|go)\b"
    r"|\bthe \w+s? (near|behind|beside|next to) the \w+s? (is|are|has|have|does|do|goes|go) (here|there)\b",
    re.IGNORECASE,
)
OUT = Path(__file__).resolve().parent.parent / "attribution" / "dictionaries" / "data" / "corpus.jsonl.gz"


class _Paragraphs(HTMLParser):
    """Text of each ``<div class="para">`` of a DocBook HTML page, skipping ``<pre>`` listings."""

    def __init__(self) -> None:
        super().__init__()
        self.paragraphs: list[str] = []
        self._depth = 0  # div depth inside the current paragraph (0: not in one)
        self._skip = 0
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("pre", "script", "style", "table"):
            self._skip += 1
        if tag == "div":
            if self._depth:
                self._depth += 1
            elif ("class", "para") in attrs:
                self._depth, self._text = 1, []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("pre", "script", "style", "table"):
            self._skip = max(0, self._skip - 1)
        if tag == "div" and self._depth:
            self._depth -= 1
            if self._depth == 0:
                self.paragraphs.append(" ".join("".join(self._text).split()))

    def handle_data(self, data: str) -> None:
        if self._depth and not self._skip:
            self._text.append(data)


def _fetch(workdir: Path) -> dict[str, Path]:
    roots = {}
    for name, version in PACKAGES.items():
        subprocess.run(["apt-get", "download", f"{name}={version}"], cwd=workdir, check=True,
                       stdout=subprocess.DEVNULL)
        deb = next(workdir.glob(f"{name}_*.deb"))
        root = workdir / name
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        roots[name] = root
    return roots


def handbook_documents(root: Path) -> list[dict]:
    docs = []
    for page in sorted((root / HANDBOOK_HTML).glob("*.html")):
        parser = _Paragraphs()
        parser.feed(page.read_text(encoding="utf-8"))
        paras = [p for p in parser.paragraphs if len(p) >= 40]
        # Documents of about 300 words: a few consecutive paragraphs of one page.
        chunk: list[str] = []
        for p in paras:
            chunk.append(p)
            if sum(len(c.split()) for c in chunk) >= 300:
                docs.append({"source": f"debian-handbook/{page.name}", "text": "\n\n".join(chunk)})
                chunk = []
        if chunk:
            docs.append({"source": f"debian-handbook/{page.name}", "text": "\n\n".join(chunk)})
    return docs


def fortune_documents(root: Path) -> list[dict]:
    docs = []
    for path in sorted((root / FORTUNE_DIR).glob("*.u8")):
        if path.stem in FORTUNE_SKIP:
            continue
        for cookie in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            text = "\n".join(line.rstrip() for line in cookie.strip("%\n").splitlines()).strip()
            docs.append({"source": f"fortunes/{path.stem}", "text": text})
    return docs


def clean(docs: list[dict]) -> tuple[list[dict], dict[str, int]]:
    """Drop short, duplicate and leaking documents; return the rest and the counts dropped."""
    seen: set[str] = set()
    kept, dropped = [], {"short": 0, "duplicate": 0, "leakage": 0}
    for doc in docs:
        if len(doc["text"]) < 40:
            dropped["short"] += 1
            continue
        key = hashlib.sha1(" ".join(doc["text"].lower().split()).encode()).hexdigest()
        if key in seen:
            dropped["duplicate"] += 1
            continue
        if LEAKAGE.search(doc["text"]):
            dropped["leakage"] += 1
            continue
        seen.add(key)
        kept.append(doc)
    return kept, dropped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        roots = _fetch(Path(tmp))
        docs = handbook_documents(roots["debian-handbook"]) + fortune_documents(roots["fortunes"])
    docs, dropped = clean(docs)
    random.Random(SEED).shuffle(docs)
    for i, doc in enumerate(docs):
        doc["split"] = "heldout" if i >= len(docs) - HELD_OUT_DOCS else "train"
    payload = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".tmp")
    # mtime=0 keeps the gzip bytes identical between runs.
    with open(tmp_out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        gz.write(payload)
    tmp_out.replace(args.out)
    words = sum(len(d["text"].split()) for d in docs)
    print(json.dumps({"documents": len(docs), "words": words, "dropped": dropped,
                      "bytes": args.out.stat().st_size, "sha256": hashlib.sha256(args.out.read_bytes()).hexdigest()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
