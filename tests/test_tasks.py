"""Tasks: template generation, user JSONL tasks, validation errors, answer ids and metrics.

The tokenizer is built here from a word list (byte-level BPE whose merges
spell out exactly those words), so a word is one token if and only if it is
in the list. The grammar tables below are written independently of
``circuits.tasks`` and serve as ground truth.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from attribution.metrics import logit_diff, neg_log_prob
from circuits.tasks import (
    TASKS,
    Example,
    answer_ids,
    load_jsonl_task,
    make_task,
    validate_examples,
)

# Ground truth: number of each noun and verb form this test's tokenizer knows.
NOUN_NUMBER = {
    "athlete": "sg",
    "athletes": "pl",
    "manager": "sg",
    "managers": "pl",
    "parent": "sg",
    "parents": "pl",
    "author": "sg",
    "authors": "pl",
    "pilot": "sg",
    "pilots": "pl",
    "child": "sg",
    "children": "pl",
    "man": "sg",
    "men": "pl",
    "car": "sg",
    "cars": "pl",
    "house": "sg",
    "houses": "pl",
    "secretary": "sg",  # "secretaries" is deliberately missing: the pair must be dropped
}
NOUN_PAIR = {
    "athlete": "athletes",
    "manager": "managers",
    "parent": "parents",
    "author": "authors",
    "pilot": "pilots",
    "child": "children",
    "man": "men",
    "car": "cars",
    "house": "houses",
}
VERB_NUMBER = {
    "is": "sg",
    "are": "pl",
    "has": "sg",
    "have": "pl",
    "does": "sg",
    "do": "pl",
    "likes": "sg",
    "like": "pl",
    "knows": "sg",
    "know": "pl",
    "was": "sg",  # "were" is deliberately missing: was/were must never be an answer
}
OTHER_WORDS = ["that", "the", "near", "behind"]

# Which word (by index after splitting on spaces) the answer agrees with.
AGREEING_WORD = {"simple": 1, "within_rc": 4, "across_rc": 1, "across_pp": 1}


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE in which "The" and " w" for each listed w are single tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges: list[tuple[str, str]] = []
    for w in ["The", *("Ġ" + w for w in words)]:
        piece = w[0]
        for ch in w[1:]:
            if (piece, ch) not in merges:
                merges.append((piece, ch))
            piece += ch
            vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return word_tokenizer([*NOUN_NUMBER, *VERB_NUMBER, *OTHER_WORDS])


def n_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def test_test_tokenizer_splits_unknown_words(tok):
    assert n_tokens(tok, " parents") == 1 and n_tokens(tok, "The parents") == 2
    assert n_tokens(tok, " secretaries") > 1 and n_tokens(tok, " were") > 1


# ------------------------------------------------------------------ templates


@pytest.mark.parametrize("name", TASKS)
def test_templates_give_equal_length_prefixes_and_single_token_answers(tok, name):
    task = make_task(name, tok, n_train=10, n_test=5, seed=1)
    lengths = set()
    for ex in task.train + task.test:
        assert n_tokens(tok, ex.clean_prefix) == n_tokens(tok, ex.patch_prefix)
        assert n_tokens(tok, ex.clean_answer) == n_tokens(tok, ex.patch_answer) == 1
        assert ex.clean_answer.startswith(" ") and ex.patch_answer.startswith(" ")
        lengths.add(n_tokens(tok, ex.clean_prefix))
    assert len(lengths) == 1  # positions line up across the whole task


@pytest.mark.parametrize("name", TASKS)
def test_patch_flips_the_subject_number_and_answers_agree(tok, name):
    task = make_task(name, tok, n_train=12, n_test=6, seed=2)
    k = AGREEING_WORD[name]
    for ex in task.train + task.test:
        clean, patch = ex.clean_prefix.split(" "), ex.patch_prefix.split(" ")
        assert len(clean) == len(patch)
        # Only the agreeing noun differs, and it is the same noun in the other number.
        assert [i for i in range(len(clean)) if clean[i] != patch[i]] == [k]
        a, b = clean[k], patch[k]
        assert NOUN_PAIR.get(a) == b or NOUN_PAIR.get(b) == a
        assert NOUN_NUMBER[a] != NOUN_NUMBER[b]
        # Answers agree with their own prefix's subject.
        assert VERB_NUMBER[ex.clean_answer.strip()] == NOUN_NUMBER[a]
        assert VERB_NUMBER[ex.patch_answer.strip()] == NOUN_NUMBER[b]
        if name == "across_rc":  # the relative-clause verb agrees with the RC subject
            assert VERB_NUMBER[clean[5]] == NOUN_NUMBER[clean[4]]


def test_words_that_are_not_single_tokens_never_appear(tok):
    for name in TASKS:
        task = make_task(name, tok, n_train=10, n_test=5, seed=3)
        for ex in task.train + task.test:
            text = " ".join([ex.clean_prefix, ex.patch_prefix, ex.clean_answer, ex.patch_answer])
            assert "secretar" not in text and " was" not in text and " were" not in text


def test_split_is_seeded_sized_and_disjoint(tok):
    a = make_task("within_rc", tok, n_train=20, n_test=8, seed=7)
    b = make_task("within_rc", tok, n_train=20, n_test=8, seed=7)
    c = make_task("within_rc", tok, n_train=20, n_test=8, seed=8)
    assert a == b
    assert a.train != c.train
    assert (len(a.train), len(a.test)) == (20, 8)
    assert not {e.clean_prefix for e in a.train} & {e.clean_prefix for e in a.test}
    assert len(set(a.train)) == 20 and len(set(a.test)) == 8


def test_case_names_the_numbers_of_both_nouns(tok):
    task = make_task("across_pp", tok, n_train=10, n_test=0, seed=0)
    for ex in task.train:
        words = ex.clean_prefix.split(" ")
        num = {"sg": "singular", "pl": "plural"}
        assert ex.case == f"{num[NOUN_NUMBER[words[1]]]}_{num[NOUN_NUMBER[words[4]]]}"


def test_asking_for_more_examples_than_exist_says_so(tok):
    # simple: 7 known subject pairs x 2 numbers = 14 distinct clean prefixes.
    with pytest.raises(ValueError, match="yields only .* ask for fewer"):
        make_task("simple", tok, n_train=100, n_test=100)


def test_unknown_task_lists_the_existing_ones(tok):
    with pytest.raises(ValueError, match="simple, within_rc, across_rc, across_pp"):
        make_task("agreement", tok, 4, 4)  # type: ignore[arg-type]


# ------------------------------------------------------------------ JSONL


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_paired_jsonl_rows_become_paired_examples(tok, tmp_path):
    rows = [
        {
            "clean_prefix": "The parents",
            "patch_prefix": "The parent",
            "clean_answer": " are",
            "patch_answer": " is",
            "case": "plural",
        },
        {
            "clean_prefix": "The man",
            "patch_prefix": "The men",
            "clean_answer": " has",
            "patch_answer": " have",
        },
    ]
    task = load_jsonl_task(write_jsonl(tmp_path / "mine.jsonl", rows), tok)
    assert task.name == "mine" and task.test == []
    assert task.train == [
        Example("The parents", "The parent", " are", " is", "plural"),
        Example("The man", "The men", " has", " have", None),
    ]


def test_unpaired_jsonl_rows_become_unpaired_examples(tok, tmp_path):
    rows = [
        {"prefix": "The parents", "answer": " are"},
        "",
        {"prefix": "The child", "answer": " is"},
    ]
    task = load_jsonl_task(write_jsonl(tmp_path / "u.jsonl", rows), tok)
    assert task.train == [
        Example("The parents", None, " are", None),
        Example("The child", None, " is", None),
    ]
    assert not task.train[0].paired


def test_jsonl_test_split_is_seeded(tok, tmp_path):
    rows = [{"prefix": f"The {w}", "answer": " is"} for w in ["man", "child", "pilot", "author"]]
    path = write_jsonl(tmp_path / "u.jsonl", rows)
    a, b = (
        load_jsonl_task(path, tok, n_test=1, seed=3),
        load_jsonl_task(path, tok, n_test=1, seed=3),
    )
    assert a == b and len(a.train) == 3 and len(a.test) == 1
    assert sorted(e.clean_prefix for e in a.train + a.test) == sorted(r["prefix"] for r in rows)


# ------------------------------------------------------------------ bad input


PAIR = {
    "clean_prefix": "The parents",
    "patch_prefix": "The parent",
    "clean_answer": " are",
    "patch_answer": " is",
}


@pytest.mark.parametrize(
    "rows, pattern",
    [
        (
            [PAIR, PAIR | {"patch_prefix": "The secretaries"}],
            r"line 2: clean prefix 'The parents' has 2 tokens but patch prefix 'The secretaries' has \d+",
        ),
        (
            [PAIR, PAIR, PAIR | {"patch_answer": " were"}],
            r"line 3: patch_answer ' were' is \d+ tokens, not one",
        ),
        ([PAIR, "{not json"], r"line 2: not valid JSON"),
        (
            [PAIR, {k: v for k, v in PAIR.items() if k != "patch_answer"}],
            r"line 2: missing key 'patch_answer'",
        ),
        ([{"prefix": "The man"}], r"line 1: missing key 'answer'"),
        (
            [PAIR, {"prefix": "The man", "answer": " is"}],
            r"line 2: a unpaired row in a file of paired",
        ),
        ([PAIR, [1, 2]], r"line 2: expected a JSON object"),
        ([""], r"is empty"),
    ],
    ids=[
        "unequal-lengths",
        "multi-token-answer",
        "bad-json",
        "missing-key",
        "missing-key-unpaired",
        "mixed-kinds",
        "not-an-object",
        "empty",
    ],
)
def test_bad_jsonl_raises_one_clear_sentence(tok, tmp_path, rows, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        load_jsonl_task(write_jsonl(tmp_path / "bad.jsonl", rows), tok)
    msg = str(info.value)
    assert "\n" not in msg and msg.endswith(".")


def test_in_memory_examples_are_validated_by_row(tok):
    exs = [Example("The man", "The men", " is", " are"), Example("The man", None, " were", None)]
    with pytest.raises(ValueError, match=r"row 2: clean_answer ' were'"):
        validate_examples(exs, tok)
    with pytest.raises(ValueError, match="empty"):
        validate_examples([], tok)


# ------------------------------------------------------------------ ids and metrics


def test_answer_ids_are_the_tokenizer_ids_of_the_answers(tok):
    exs = [
        Example("The man", "The men", " is", " are"),
        Example("The men", "The man", " have", " has"),
    ]
    clean, patch = answer_ids(exs, tok)
    ids = tok.convert_tokens_to_ids
    assert clean.tolist() == [ids("Ġis"), ids("Ġhave")]
    assert patch.tolist() == [ids("Ġare"), ids("Ġhas")]
    assert clean.dtype == torch.long
    clean_u, patch_u = answer_ids([Example("The man", None, " is", None)], tok)
    assert clean_u.tolist() == [ids("Ġis")] and patch_u is None


def test_logit_diff_matches_a_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(5, 3, 11)
    rows = torch.tensor([0, 1, 0, 2, 1])  # rows repeat, as during integrated gradients
    good, bad = torch.tensor([2, 5, 9]), torch.tensor([7, 1, 0])
    got = logit_diff(good, bad)(logits, rows)
    L = logits.tolist()
    want = [L[i][2][[2, 5, 9][r]] - L[i][2][[7, 1, 0][r]] for i, r in enumerate([0, 1, 0, 2, 1])]
    assert got.shape == (5,)
    assert got.tolist() == pytest.approx(want, abs=1e-6)


def test_neg_log_prob_matches_a_hand_computation():
    torch.manual_seed(1)
    logits = torch.randn(3, 2, 6)
    rows = torch.tensor([1, 0, 1])
    ans = torch.tensor([4, 2])
    got = neg_log_prob(ans)(logits, rows)
    want = []
    for i, r in enumerate([1, 0, 1]):
        last = logits[i, -1].tolist()
        want.append(-(last[[4, 2][r]] - math.log(sum(math.exp(x) for x in last))))
    assert got.tolist() == pytest.approx(want, abs=1e-5)


def test_metrics_are_differentiable():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    m = logit_diff(torch.tensor([1]), torch.tensor([2]))(logits, torch.tensor([0, 0]))
    m.sum().backward()
    g = logits.grad
    assert g[:, -1, 1].tolist() == [1.0, 1.0] and g[:, -1, 2].tolist() == [-1.0, -1.0]
    assert g.abs().sum().item() == 4.0


# ------------------------------------------------------------------ real tokenizer (optional)

SMOLLM = Path.home() / ".cache/sparse-feature-circuits/models/smollm2-135m"


@pytest.fixture(scope="module")
def smollm_tok():
    if not SMOLLM.exists():
        pytest.skip("SmolLM2 tokenizer not cached locally")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SMOLLM)


@pytest.mark.parametrize("name", TASKS)
def test_templates_work_with_the_smollm2_tokenizer(smollm_tok, name):
    task = make_task(name, smollm_tok, n_train=40, n_test=10, seed=0)
    lengths = set()
    for ex in task.train + task.test:
        n = len(smollm_tok(ex.clean_prefix)["input_ids"])
        assert n == len(smollm_tok(ex.patch_prefix)["input_ids"])
        for answer in (ex.clean_answer, ex.patch_answer):
            assert len(smollm_tok(answer, add_special_tokens=False)["input_ids"]) == 1
        lengths.add(n)
    assert len(lengths) == 1
