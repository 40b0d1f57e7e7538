"""SHIFT data: texts with a true label and a spurious attribute (SPEC §6.1).

The paper's testbed is Bias in Bios: classify professor (label 0) vs nurse
(label 1) from a biography, where gender (0 male, 1 female) is the spurious
attribute. Three sources:

- :func:`synthetic_bios`: an offline, seeded synthetic professor/nurse set. Gender
  is carried by first names and by pronouns in every sentence (strong and
  repeated); profession by one sentence describing the work (real, but one
  sentence among several and so weaker in a mean-pooled representation).
  Train and test use disjoint first names, surnames and work sentences.
- :func:`load_bias_in_bios`: the real ``LabHC/bias_in_bios`` files (parquet or
  JSON/JSONL with ``hard_text``, ``profession`` 21 = professor / 13 = nurse,
  ``gender`` 0 male / 1 female), for users who have them locally.
- :func:`load_table`: any CSV/JSONL with a text, a binary label and a binary
  spurious-attribute column (column names are options).

:func:`make_splits` turns labelled examples into the paper's sets: the
*ambiguous* set (label == spurious: male professors and female nurses only, each
group truncated to the smaller one) and the *balanced* set (all four groups,
truncated to the smallest), each with a train and a test part.
"""

from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

GROUP_NAMES = {(0, 0): "male professor", (0, 1): "female professor", (1, 0): "male nurse", (1, 1): "female nurse"}


@dataclass
class Examples:
    """Parallel lists: ``texts``, ``labels`` (true class, 0/1) and ``spurious`` (0/1)."""

    texts: list[str]
    labels: list[int]
    spurious: list[int]

    def __post_init__(self) -> None:
        if not (len(self.texts) == len(self.labels) == len(self.spurious)):
            raise ValueError("texts, labels and spurious must have the same length.")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: list[int]) -> Examples:
        return Examples([self.texts[i] for i in index], [self.labels[i] for i in index],
                        [self.spurious[i] for i in index])

    def group(self, label: int, spurious: int) -> Examples:
        return self.subset([i for i in range(len(self)) if self.labels[i] == label and self.spurious[i] == spurious])

    def counts(self) -> dict[str, int]:
        """Examples per (label, spurious) group, by group name."""
        return {GROUP_NAMES[g]: sum(1 for a, b in zip(self.labels, self.spurious) if (a, b) == g)
                for g in GROUP_NAMES}


@dataclass
class ShiftSplits:
    """The four sets SHIFT uses (SPEC §6.1)."""

    ambiguous_train: Examples
    ambiguous_test: Examples
    balanced_train: Examples
    balanced_test: Examples

    def counts(self) -> dict[str, dict[str, int]]:
        return {name: getattr(self, name).counts() for name in
                ("ambiguous_train", "ambiguous_test", "balanced_train", "balanced_test")}


# --------------------------------------------------------------- synthetic

_MALE = ["James", "John", "Robert", "Michael", "David", "William", "Richard", "Thomas", "Charles", "Daniel",
         "Matthew", "Anthony", "Mark", "Paul", "Steven", "Andrew", "Kevin", "Brian", "George", "Edward",
         "Peter", "Henry", "Frank", "Samuel", "Patrick", "Jack", "Eric", "Adam", "Ryan", "Gary"]
_FEMALE = ["Mary", "Patricia", "Jennifer", "Linda", "Elizabeth", "Susan", "Jessica", "Sarah", "Karen", "Nancy",
           "Lisa", "Margaret", "Sandra", "Ashley", "Emily", "Donna", "Michelle", "Laura", "Rebecca", "Helen",
           "Anna", "Julia", "Rachel", "Emma", "Grace", "Alice", "Claire", "Megan", "Hannah", "Olivia"]
_SURNAMES = ["Smith", "Brown", "Wilson", "Taylor", "Clark", "Hall", "Allen", "Young", "King", "Wright",
             "Scott", "Green", "Baker", "Adams", "Nelson", "Carter", "Mitchell", "Roberts", "Turner", "Phillips",
             "Parker", "Evans", "Edwards", "Collins", "Stewart", "Morris", "Murphy", "Cook", "Rogers", "Cooper"]
_CITIES = ["Boston", "Denver", "Chicago", "Seattle", "Dallas", "Austin", "Portland", "Atlanta", "Phoenix", "Detroit"]

# Work sentences: {P} subject pronoun, {p} possessive. Train and test pools are disjoint.
_WORK = {
    0: {  # professor
        "train": ["{P} teaches courses at the university.", "{P} supervises doctoral students.",
                  "{P} publishes research in academic journals.", "{P} gives lectures to undergraduates.",
                  "{P} writes grant proposals for {p} lab.", "{P} serves on the faculty senate.",
                  "{P} grades exams and advises graduate students.", "{P} is writing a book about {p} research."],
        "test": ["{P} teaches a seminar on economics.", "{P} runs a research group at the college.",
                 "{P} recently received tenure in {p} department.", "{P} mentors students writing theses.",
                 "{P} presents {p} findings at academic conferences."],
    },
    1: {  # nurse
        "train": ["{P} cares for patients at the hospital.", "{P} gives medication to patients on the ward.",
                  "{P} checks the vital signs of patients.", "{P} works night shifts in the clinic.",
                  "{P} assists doctors during surgery.", "{P} works in the emergency room.",
                  "{P} changes bandages and dresses wounds.", "{P} helps patients recover after operations."],
        "test": ["{P} works as a registered nurse in intensive care.", "{P} treats patients in the clinic.",
                 "{P} looks after elderly patients in a care home.", "{P} takes blood samples from patients.",
                 "{P} monitors patients in the children's hospital."],
    },
}
_OPEN = {
    "train": ["{name} {surname} lives in {city}.", "{name} {surname} grew up in {city}.",
              "{name} {surname} moved to {city} ten years ago."],
    "test": ["{name} {surname} was born in {city}.", "{name} {surname} is from {city}."],
}
_FILLER = {
    "train": ["{P} enjoys hiking with {p} family.", "{P} likes cooking for {p} friends.",
              "In {p} free time {s} plays the piano.", "{P} has two children and a dog.",
              "{P} reads novels at the weekend.", "{P} spends {p} holidays by the sea."],
    "test": ["{P} loves gardening with {p} kids.", "At the weekend {s} goes running with {p} brother.",
             "{P} collects old records in {p} spare time.", "{P} volunteers at {p} local library."],
}


def synthetic_bios(n_per_group: int, split: str = "train", seed: int = 0) -> Examples:
    """``n_per_group`` biographies for each of the four (profession, gender) groups.

    ``split`` ("train" or "test") picks disjoint pools of first names, surnames,
    openers, work sentences and filler sentences. A bio is an opener with the name,
    one work sentence and two filler sentences, each sentence with the pronoun;
    the work sentence sits in a random place after the opener. Deterministic in
    ``(n_per_group, split, seed)``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"Unknown split {split!r}: choose 'train' or 'test'.")
    if n_per_group < 1:
        raise ValueError(f"n_per_group must be at least 1, got {n_per_group}.")
    rng = random.Random(f"{seed}-{split}")
    half = 0 if split == "train" else 1
    names = {0: _MALE[half::2], 1: _FEMALE[half::2]}
    surnames = _SURNAMES[half::2]
    texts, labels, spurious = [], [], []
    for label in (0, 1):
        for gender in (0, 1):
            pron = {"P": "He", "s": "he", "p": "his"} if gender == 0 else {"P": "She", "s": "she", "p": "her"}
            for _ in range(n_per_group):
                opener = rng.choice(_OPEN[split]).format(
                    name=rng.choice(names[gender]), surname=rng.choice(surnames), city=rng.choice(_CITIES))
                work = rng.choice(_WORK[label][split]).format(**pron)
                fillers = [f.format(**pron) for f in rng.sample(_FILLER[split], 2)]
                body = fillers[:]
                body.insert(rng.randrange(3), work)
                texts.append(" ".join([opener, *body]))
                labels.append(label)
                spurious.append(gender)
    order = list(range(len(texts)))
    rng.shuffle(order)
    return Examples(texts, labels, spurious).subset(order)


# --------------------------------------------------------------- files

BIAS_IN_BIOS_PROFESSIONS = {21: 0, 13: 1}  # professor -> 0, nurse -> 1


def _read_records(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pandas as pd

        return pd.read_parquet(path).to_dict("records")
    text = path.read_text(encoding="utf-8")
    if suffix == ".csv":
        return list(csv.DictReader(text.splitlines()))
    if suffix in (".jsonl", ".ndjson"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    if suffix == ".json":
        doc = json.loads(text)
        if isinstance(doc, dict):  # column-oriented or {"data": [...]} layouts
            doc = doc.get("data", doc.get("rows", doc))
            if isinstance(doc, dict):
                cols = list(doc)
                doc = [dict(zip(cols, vals)) for vals in zip(*(doc[c] for c in cols))]
        return list(doc)
    raise ValueError(f"{path} has an unsupported extension {suffix!r}: give a .parquet, .csv, .json or .jsonl file.")


def _binary(value, column: str, path: Path, row: int) -> int:
    try:
        v = int(float(value))
    except (TypeError, ValueError):
        v = None
    if v not in (0, 1):
        raise ValueError(f"{path} row {row}: column {column!r} has value {value!r}; it must be 0 or 1.")
    return v


def load_table(path: str | os.PathLike, text: str = "text", label: str = "label",
               spurious: str = "spurious") -> Examples:
    """Examples from a CSV/JSON/JSONL/parquet file with a text, a 0/1 label and a 0/1 spurious column.

    Raises one sentence for a missing file or column or a non-binary value.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No data file at {path}: check the path.")
    records = _read_records(path)
    if not records:
        raise ValueError(f"{path} has no rows: give a file with labelled examples.")
    for col in (text, label, spurious):
        if col not in records[0]:
            raise ValueError(
                f"{path} has no column {col!r} (columns: {sorted(records[0])}): name the right column with "
                "--text-column/--label-column/--spurious-column."
            )
    return Examples([str(r[text]) for r in records],
                    [_binary(r[label], label, path, i) for i, r in enumerate(records)],
                    [_binary(r[spurious], spurious, path, i) for i, r in enumerate(records)])


def load_bias_in_bios(path: str | os.PathLike) -> Examples:
    """Professor (0) and nurse (1) bios from a local ``LabHC/bias_in_bios`` file.

    Reads ``hard_text``, ``profession`` (21 professor, 13 nurse; other professions
    are dropped) and ``gender`` (0 male, 1 female).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No Bias in Bios file at {path}: download LabHC/bias_in_bios where you can and "
                                "give the local parquet or JSON file.")
    records = _read_records(path)
    for col in ("hard_text", "profession", "gender"):
        if records and col not in records[0]:
            raise ValueError(f"{path} has no column {col!r}: it is not a LabHC/bias_in_bios file "
                             "(use load_table for other layouts).")
    keep = [r for r in records if int(r["profession"]) in BIAS_IN_BIOS_PROFESSIONS]
    return Examples([str(r["hard_text"]) for r in keep],
                    [BIAS_IN_BIOS_PROFESSIONS[int(r["profession"])] for r in keep],
                    [_binary(r["gender"], "gender", path, i) for i, r in enumerate(keep)])


# --------------------------------------------------------------- splits

def check_examples(ex: Examples, what: str) -> None:
    """Raise if ``ex`` is empty or has a single class (nothing to classify)."""
    if len(ex) == 0:
        raise ValueError(f"The {what} set is empty: give labelled examples.")
    if len(set(ex.labels)) < 2:
        raise ValueError(f"The {what} set has a single class (label {ex.labels[0]}): a probe needs examples "
                         "of both labels.")


def ambiguous(ex: Examples, seed: int = 42) -> Examples:
    """Label == spurious only, the two groups truncated to the smaller, shuffled (SPEC §6.1)."""
    g0, g1 = ex.group(0, 0), ex.group(1, 1)
    n = min(len(g0), len(g1))
    out = Examples(g0.texts[:n] + g1.texts[:n], g0.labels[:n] + g1.labels[:n], g0.spurious[:n] + g1.spurious[:n])
    order = list(range(len(out)))
    random.Random(seed).shuffle(order)
    return out.subset(order)


def balanced(ex: Examples, seed: int = 42) -> Examples:
    """All four groups, each truncated to the smallest, shuffled (SPEC §6.1)."""
    groups = [ex.group(a, b) for a, b in GROUP_NAMES]
    n = min(len(g) for g in groups)
    idx = Examples([], [], [])
    for g in groups:
        idx = Examples(idx.texts + g.texts[:n], idx.labels + g.labels[:n], idx.spurious + g.spurious[:n])
    order = list(range(len(idx)))
    random.Random(seed).shuffle(order)
    return idx.subset(order)


def make_splits(train: Examples, test: Examples, seed: int = 42) -> ShiftSplits:
    """The ambiguous and balanced sets from a train and a test pool; each must have both labels,
    and the balanced sets need all four groups."""
    for what, ex in (("train", train), ("test", test)):
        check_examples(ex, what)
        empty = [name for (a, b), name in GROUP_NAMES.items() if not ex.group(a, b).texts]
        if empty:
            raise ValueError(f"The {what} data has no {', '.join(empty)} example: the balanced set needs all four "
                             "(label, spurious) groups.")
    return ShiftSplits(ambiguous(train, seed), ambiguous(test, seed), balanced(train, seed), balanced(test, seed))


def synthetic_splits(n_train: int = 64, n_test: int = 64, seed: int = 0) -> ShiftSplits:
    """The synthetic testbed: ``n_train``/``n_test`` bios per group in the train/test pools."""
    return make_splits(synthetic_bios(n_train, "train", seed), synthetic_bios(n_test, "test", seed))
