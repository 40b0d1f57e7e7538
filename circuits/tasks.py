"""Tasks: the prompts a circuit explains, and the metric that scores them.

An *example* is a clean prefix with the answer the model should give, and
(for paired tasks) a patch prefix that differs minimally and has a different
answer. The paper's tasks are subject-verb agreement (SPEC §1.4, Table 1):

============  =========================================  ============================
structure     clean prefix (patch flips the number of…)   answer agrees with
============  =========================================  ============================
simple        "The parent" (the subject)                  "The parent"   -> is / are
within_rc     "The athlete that the manager" (manager)    the RC subject -> likes / like
across_rc     "The athlete that the managers like"        the main subject -> is / are
              (athlete)
across_pp     "The secretary near the cars" (secretary)   the main subject -> has / have
============  =========================================  ============================

:func:`make_task` fills these templates from small vocabularies, keeping only
words that are one token for the given tokenizer, so that clean and patch
prefixes have equal length, every prefix of a task has the same length
(positions line up across examples, as aggregation ``"none"`` needs) and every
answer is one token. :func:`load_jsonl_task` reads a user's own task.

Everything is validated here, before any model work, and each problem is one
clear sentence. :func:`answer_ids` turns answers into token ids, and
:func:`attribution.metrics.logit_diff` / :func:`~attribution.metrics.neg_log_prob` build metrics with the attribution
engine's protocol ``metric(logits [n, s, vocab], rows [n]) -> [n]``.
"""

from __future__ import annotations

import itertools
import json
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

TaskName = Literal["simple", "within_rc", "across_rc", "across_pp"]
TASKS: tuple[TaskName, ...] = ("simple", "within_rc", "across_rc", "across_pp")

"""``metric(logits [n, s, vocab], rows [n]) -> [n]``; ``rows[i]`` is the example of run-row ``i``."""

# ------------------------------------------------------------------ vocabulary
# (singular, plural) pairs, without the leading space.

SUBJECTS: tuple[tuple[str, str], ...] = (
    ("athlete", "athletes"),
    ("manager", "managers"),
    ("parent", "parents"),
    ("secretary", "secretaries"),
    ("author", "authors"),
    ("pilot", "pilots"),
    ("surgeon", "surgeons"),
    ("farmer", "farmers"),
    ("teacher", "teachers"),
    ("senator", "senators"),
    ("dancer", "dancers"),
    ("doctor", "doctors"),
    ("officer", "officers"),
    ("student", "students"),
    ("lawyer", "lawyers"),
    ("painter", "painters"),
    ("singer", "singers"),
    ("customer", "customers"),
    ("guard", "guards"),
    ("driver", "drivers"),
    ("child", "children"),
    ("man", "men"),
    ("woman", "women"),
    ("boy", "boys"),
    ("girl", "girls"),
    ("friend", "friends"),
    ("king", "kings"),
    ("uncle", "uncles"),
    ("player", "players"),
    ("writer", "writers"),
)
"""Animate nouns: main subjects, and relative-clause subjects."""

PP_NOUNS: tuple[tuple[str, str], ...] = (
    ("car", "cars"),
    ("house", "houses"),
    ("table", "tables"),
    ("door", "doors"),
    ("tree", "trees"),
    ("desk", "desks"),
    ("building", "buildings"),
    ("dog", "dogs"),
    ("window", "windows"),
    ("truck", "trucks"),
    ("garden", "gardens"),
    ("book", "books"),
)
"""Nouns inside the prepositional phrase of ``across_pp``."""

PREPOSITIONS: tuple[str, ...] = ("near", "behind", "beside", "by", "with", "above", "below")

AUXILIARIES: tuple[tuple[str, str], ...] = (
    ("is", "are"),
    ("has", "have"),
    ("was", "were"),
    ("does", "do"),
)
"""Answers of ``simple``, ``across_rc`` and ``across_pp``."""

TRANSITIVE_VERBS: tuple[tuple[str, str], ...] = (
    ("likes", "like"),
    ("loves", "love"),
    ("hates", "hate"),
    ("admires", "admire"),
    ("knows", "know"),
    ("helps", "help"),
    ("sees", "see"),
    ("trusts", "trust"),
)
"""Answers of ``within_rc``, and the relative-clause verb of ``across_rc``."""


# ------------------------------------------------------------------ data types


@dataclass(frozen=True)
class Example:
    """One prompt: ``clean_prefix`` should be continued by ``clean_answer``.

    Paired examples also have ``patch_prefix`` (same token length, the minimal
    change) and ``patch_answer``; unpaired ones have None there. Answers carry
    their leading space (``" is"``). ``case`` names the grammatical numbers,
    e.g. ``"singular_plural"`` (main subject, other noun), when known.
    """

    clean_prefix: str
    patch_prefix: str | None
    clean_answer: str
    patch_answer: str | None
    case: str | None = None

    @property
    def paired(self) -> bool:
        return self.patch_prefix is not None


@dataclass
class TaskData:
    """A named task with its train split (for discovery) and test split (for evaluation)."""

    name: str
    train: list[Example]
    test: list[Example]


# ------------------------------------------------------------------ tokenizer helpers


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _is_one_token(tokenizer: Any, word: str) -> bool:
    return len(_ids(tokenizer, word)) == 1


def prefix_length(tokenizer: Any, prefix: str) -> int:
    """Token count of a prefix as the model sees it (with the tokenizer's special tokens)."""
    return len(tokenizer(prefix)["input_ids"])


# ------------------------------------------------------------------ templates

_NUM = ("singular", "plural")


def _render(name: TaskName, combo: tuple, flip: bool) -> tuple[str, str, str]:
    """``(prefix, answer, case)``; ``flip`` changes the number of the agreeing noun."""
    if name == "simple":
        (noun, aux, n1) = combo
        n1 ^= flip
        return f"The {noun[n1]}", " " + aux[n1], _NUM[n1]
    if name == "within_rc":
        (noun1, n1, noun2, n2, verb) = combo
        n2 ^= flip
        return f"The {noun1[n1]} that the {noun2[n2]}", " " + verb[n2], f"{_NUM[n1]}_{_NUM[n2]}"
    if name == "across_rc":
        (noun1, n1, noun2, n2, verb, aux) = combo
        n1 ^= flip
        prefix = f"The {noun1[n1]} that the {noun2[n2]} {verb[n2]}"
        return prefix, " " + aux[n1], f"{_NUM[n1]}_{_NUM[n2]}"
    (noun1, n1, prep, noun2, n2, aux) = combo
    n1 ^= flip
    return f"The {noun1[n1]} {prep} the {noun2[n2]}", " " + aux[n1], f"{_NUM[n1]}_{_NUM[n2]}"


def _combos(name: TaskName, tokenizer: Any) -> list[tuple]:
    """Every template filling whose words are single tokens (with a leading space)."""

    def pairs(table: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        return [p for p in table if all(_is_one_token(tokenizer, " " + w) for w in p)]

    subj, verbs, aux = pairs(SUBJECTS), pairs(TRANSITIVE_VERBS), pairs(AUXILIARIES)
    n = (0, 1)
    if name == "simple":
        return list(itertools.product(subj, aux, n))
    if name == "within_rc":
        return [c for c in itertools.product(subj, n, subj, n, verbs) if c[0] != c[2]]
    if name == "across_rc":
        return [c for c in itertools.product(subj, n, subj, n, verbs, aux) if c[0] != c[2]]
    preps = [p for p in PREPOSITIONS if _is_one_token(tokenizer, " " + p)]
    return list(itertools.product(subj, n, preps, pairs(PP_NOUNS), n, aux))


def make_task(name: TaskName, tokenizer: Any, n_train: int, n_test: int, seed: int = 0) -> TaskData:
    """Generate a subject-verb agreement task with disjoint, seeded train and test splits.

    Clean and patch prefixes have equal token length, all prefixes of the task
    have the same length, and every answer is one token, checked on the full
    prompt (``tokenize(prefix + answer) == tokenize(prefix) + tokenize(answer)``).
    Train and test share no clean prefix.
    """
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}: the built-in tasks are {', '.join(TASKS)}.")
    if n_train < 0 or n_test < 0 or n_train + n_test == 0:
        raise ValueError("Ask for at least one example: n_train and n_test are >= 0, not both 0.")
    combos = _combos(name, tokenizer)
    random.Random(seed).shuffle(combos)
    want = {"test": n_test, "train": n_train}
    out: dict[str, list[Example]] = {"test": [], "train": []}
    split_of: dict[str, str] = {}
    length: int | None = None
    for combo in combos:
        if all(len(out[s]) >= want[s] for s in out):
            break
        ex = _example(name, combo, tokenizer)
        if ex is None:
            continue
        n_tok = prefix_length(tokenizer, ex.clean_prefix)
        length = n_tok if length is None else length
        if n_tok != length:
            continue
        split = split_of.get(ex.clean_prefix) or ("test" if len(out["test"]) < n_test else "train")
        if len(out[split]) < want[split]:
            split_of[ex.clean_prefix] = split
            out[split].append(ex)
    if any(len(out[s]) < want[s] for s in out):
        raise ValueError(
            f"Task {name!r} yields only {len(out['train'])} train and {len(out['test'])} test "
            f"examples for this tokenizer (asked for {n_train} and {n_test}); ask for fewer."
        )
    return TaskData(name, out["train"], out["test"])


def _example(name: TaskName, combo: tuple, tokenizer: Any) -> Example | None:
    clean, a_clean, case = _render(name, combo, flip=False)
    patch, a_patch, _ = _render(name, combo, flip=True)
    if prefix_length(tokenizer, clean) != prefix_length(tokenizer, patch):
        return None
    for prefix, answer in ((clean, a_clean), (patch, a_patch)):
        a = _ids(tokenizer, answer)
        if len(a) != 1 or _ids(tokenizer, prefix + answer) != _ids(tokenizer, prefix) + a:
            return None
    return Example(clean, patch, a_clean, a_patch, case)


# ------------------------------------------------------------------ user tasks

_PAIRED_KEYS = ("clean_prefix", "patch_prefix", "clean_answer", "patch_answer")
_UNPAIRED_KEYS = ("prefix", "answer")


def load_jsonl_task(
    path: str | os.PathLike, tokenizer: Any, n_test: int = 0, seed: int = 0, n_train: int | None = None
) -> TaskData:
    """Read a task from JSONL and validate it; ``n_test`` rows (seeded) go to the test split.

    Paired rows are ``{"clean_prefix", "patch_prefix", "clean_answer",
    "patch_answer"}``; unpaired rows are ``{"prefix", "answer"}`` (attribution
    then zero-ablates instead of patching). Extra keys (``"case"``) are kept
    when they name the case, and otherwise ignored. A file is all one kind.

    Every row is parsed and checked for its keys (cheap), but only the rows
    used are tokenised and checked against the tokenizer: the ``n_test`` test
    rows and, with ``n_train`` given, the first ``n_train`` training rows (the
    split is the same as with all rows, since a seeded shuffle depends only on
    the number of rows). So ``--examples 8`` on a file of 200k rows tokenises 8
    rows plus the test split, not 200k.
    """
    path = Path(path)
    examples: list[Example] = []
    lines: list[int] = []
    kind: str | None = None
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {lineno}: not valid JSON ({err.msg}).") from None
        if not isinstance(row, dict):
            raise ValueError(
                f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}."
            )
        row_kind = "paired" if "clean_prefix" in row else "unpaired"
        keys = _PAIRED_KEYS if row_kind == "paired" else _UNPAIRED_KEYS
        missing = [k for k in keys if k not in row]
        if missing:
            raise ValueError(
                f"{path}, line {lineno}: missing key {missing[0]!r} (a {row_kind} row needs "
                f"{', '.join(keys)})."
            )
        bad = [k for k in keys if not isinstance(row[k], str)]
        if bad:
            raise ValueError(f"{path}, line {lineno}: {bad[0]!r} must be a string.")
        if kind is not None and row_kind != kind:
            raise ValueError(
                f"{path}, line {lineno}: a {row_kind} row in a file of {kind} rows; "
                "use one kind per file."
            )
        kind = row_kind
        lines.append(lineno)
        case = row.get("case") if isinstance(row.get("case"), str) else None
        if row_kind == "paired":
            examples.append(
                Example(
                    row["clean_prefix"],
                    row["patch_prefix"],
                    row["clean_answer"],
                    row["patch_answer"],
                    case,
                )
            )
        else:
            examples.append(Example(row["prefix"], None, row["answer"], None, case))
    if not examples:
        validate_examples(examples, tokenizer, source=str(path), lines=lines)  # raises: the file is empty
    order = list(range(len(examples)))
    if n_test:
        if n_test >= len(examples):
            raise ValueError(
                f"{path} has {len(examples)} rows, too few for {n_test} test rows and any train rows."
            )
        random.Random(seed).shuffle(order)
    used = order[:n_test] + order[n_test:][: n_train if n_train is not None else len(order)]
    chosen = sorted(used)  # file order, so that the first problem reported is the first in the file
    validate_examples([examples[i] for i in chosen], tokenizer, source=str(path), lines=[lines[i] for i in chosen])
    if kind == "paired":
        _check_one_length([examples[i] for i in chosen], tokenizer, str(path), [lines[i] for i in chosen])
    train = [examples[i] for i in order[n_test:]]
    return TaskData(path.stem, train, [examples[i] for i in order[:n_test]])


def _spans(numbers: list[int]) -> str:
    """``[1, 2, 3, 5]`` -> ``"1-3, 5"``."""
    out, start = [], None
    for i, n in enumerate(numbers):
        start = n if start is None else start
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            out.append(str(n) if n == start else f"{start}-{n}")
            start = None
    return ", ".join(out)


def _check_one_length(examples: Sequence[Example], tokenizer: Any, source: str, lines: Sequence[int]) -> None:
    """Paired prompts of one task share one token length: circuit nodes sit at positions shared by
    every prompt, and evaluation ablates them there. Refuses with the line numbers of each length."""
    by_length: dict[int, list[int]] = {}
    for ex, line in zip(examples, lines):
        by_length.setdefault(prefix_length(tokenizer, ex.clean_prefix), []).append(line)
    if len(by_length) > 1:
        groups = sorted(by_length.items(), key=lambda kv: -len(kv[1]))
        desc = "; ".join(f"{n} tokens on line{'s' if len(ls) > 1 else ''} {_spans(ls)}" for n, ls in groups)
        raise ValueError(f"{source}: the prompts tokenise to different lengths ({desc}); a task's prompts need one "
                         "length, since circuit nodes sit at shared positions: split the file by length.")


def validate_examples(
    examples: Sequence[Example],
    tokenizer: Any,
    source: str = "dataset",
    lines: Sequence[int] | None = None,
) -> None:
    """Raise one clear sentence for the first problem: an empty dataset, clean/patch prefixes of
    different token lengths, or an answer that is not a single token.

    Problems name the row (numbered from 1), or the file line when ``lines`` gives each
    example's line number.
    """
    if not examples:
        raise ValueError(f"{source} is empty: a task needs at least one example.")
    for i, ex in enumerate(examples):
        where = f"line {lines[i]}" if lines is not None else f"row {i + 1}"
        if ex.patch_prefix is not None:
            n_c = prefix_length(tokenizer, ex.clean_prefix)
            n_p = prefix_length(tokenizer, ex.patch_prefix)
            if n_c != n_p:
                raise ValueError(
                    f"{source}, {where}: clean prefix {ex.clean_prefix!r} has {n_c} tokens but "
                    f"patch prefix {ex.patch_prefix!r} has {n_p}; paired prefixes need equal lengths."
                )
        for field, answer in (("clean_answer", ex.clean_answer), ("patch_answer", ex.patch_answer)):
            if answer is None:
                continue
            n = len(_ids(tokenizer, answer))
            if n != 1:
                raise ValueError(
                    f"{source}, {where}: {field} {answer!r} is {n} tokens, not one; answers must be "
                    "single tokens (usually with a leading space, like ' is')."
                )


# ------------------------------------------------------------------ answer ids


def answer_ids(examples: Sequence[Example], tokenizer: Any) -> tuple[Tensor, Tensor | None]:
    """Token ids of the answers: ``(clean_ids [n], patch_ids [n])`` as LongTensors.

    ``patch_ids`` is None when the examples are unpaired.
    """
    validate_examples(examples, tokenizer)
    clean = torch.tensor([_ids(tokenizer, ex.clean_answer)[0] for ex in examples])
    paired = [ex.patch_answer is not None for ex in examples]
    if not any(paired):
        return clean, None
    if not all(paired):
        raise ValueError(
            "Some examples have a patch answer and some do not; use one kind per task."
        )
    patch = torch.tensor([_ids(tokenizer, ex.patch_answer)[0] for ex in examples])  # type: ignore[arg-type]
    return clean, patch


def load_task(task: str | os.PathLike, tokenizer: Any, n_train: int = 32, n_test: int = 40, seed: int = 0) -> TaskData:
    """A built-in task by name (:data:`TASKS`), or a ``.jsonl`` file, with ``n_train``
    training and ``n_test`` test examples (seeded)."""
    name = os.fspath(task)
    if name in TASKS:
        return make_task(name, tokenizer, n_train, n_test, seed)  # type: ignore[arg-type]
    if name.endswith(".jsonl"):
        if not Path(name).exists():
            raise FileNotFoundError(f"No task file at {name}: give a path to an existing JSONL file.")
        data = load_jsonl_task(name, tokenizer, n_test=n_test, seed=seed, n_train=n_train)
        return TaskData(data.name, data.train[:n_train], data.test)
    raise ValueError(f"Unknown task {name!r}: the built-in tasks are {', '.join(TASKS)}, or pass a .jsonl file.")
