"""Metric values computed by hand from each benchmark's definition."""

import pytest

from pipeline.eval.metrics import (aggregate, anls, extract_choice, levenshtein, mc_accuracy, normalize_vqa_answer,
                                   ocrbench_match, relaxed_accuracy, score_sample, vqa_accuracy)

# Ten human answers: four normalise to "2", two to "red car", three to "blue", one to "black and white".
HUMANS = ["two", "2", "2 ", "Two.", "red car", "the red car", "blue", "blue", "blue", "black-and-white"]


@pytest.mark.parametrize("raw, expected", [
    ("Two.", "2"),
    ("The Red Car", "red car"),
    ("dont", "don't"),
    ("hed've", "he'd've"),
    ("It's 3.5 m.", "it 's 3.5 m"),
    ("1,000", "1000"),
    ("(A) yes!", "yes"),                      # "(" glued to a word becomes a space, ") " is deleted
    ("black-and-white", "black and white"),
    ("none", "0"),
    ("an apple\tpie\n", "apple pie"),
    ("", ""),
])
def test_vqa_normalisation(raw, expected):
    assert normalize_vqa_answer(raw) == expected


@pytest.mark.parametrize("prediction, expected", [
    ("2", 1.0),                 # 4 matches: every leave-one-out subset keeps >= 3
    ("Red car", 0.6),           # 2 matches: (2 * 1/3 + 8 * 2/3) / 10
    ("blue", 0.9),              # 3 matches: (3 * 2/3 + 7 * 1) / 10
    ("black and white", 0.3),   # 1 match: (0 + 9 * 1/3) / 10
    ("an orange", 0.0),
    ("", 0.0),
])
def test_vqa_accuracy_leave_one_out(prediction, expected):
    assert vqa_accuracy(prediction, HUMANS) == pytest.approx(expected)


def test_vqa_accuracy_without_answers_is_zero():
    assert vqa_accuracy("anything", []) == 0.0


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("abc", "abc") == 0


@pytest.mark.parametrize("prediction, answers, expected", [
    ("Hello Wrld", ["hello world"], 10 / 11),          # 1 edit over the longer raw string (11 chars)
    ("Hello Wrld", ["zzz", "hello world"], 10 / 11),   # best answer counts
    ("  hello   world ", ["hello world"], 1.0),        # whitespace is normalised before the distance
    ("abcd", ["abxy"], 0.5),                           # NL = 0.5 is kept
    ("abcde", ["abxyz"], 0.0),                         # NL = 0.6 is above the threshold
    ("", ["abc"], 0.0),
    ("", [""], 1.0),
    ("0.28", ["0.28"], 1.0),
])
def test_anls(prediction, answers, expected):
    assert anls(prediction, answers) == pytest.approx(expected)


@pytest.mark.parametrize("prediction, target, expected", [
    ("104", "100", 1.0),      # 4% off
    ("105", "100", 1.0),      # exactly 5%
    ("106", "100", 0.0),
    ("45%", "0.45", 1.0),     # a percentage is a fraction
    ("45", "45%", 0.0),
    ("44%", "45%", 1.0),      # 0.44 vs 0.45: 2.2% off
    ("0", "0", 1.0),          # zero target: string match
    ("0.0", "0", 0.0),
    ("Yes", "yes", 1.0),
    ("12 kg", "12", 0.0),     # a unit makes it text, and the text differs
    (" 12 ", "12", 1.0),
    ("", "12", 0.0),
])
def test_relaxed_accuracy(prediction, target, expected):
    assert relaxed_accuracy(prediction, [target]) == expected


OPTIONS = ["red", "dark red", "blue", "green"]


@pytest.mark.parametrize("prediction, expected", [
    ("B", "B"),
    ("(C)", "C"),
    ("D.", "D"),
    ("Answer: D", "D"),
    ("The answer is (B).", "B"),
    ("C. blue", "C"),
    ("It is blue.", "C"),              # option text
    ("dark red", "B"),                 # "red" is inside "dark red": the longer option wins
    ("A", "A"),
    ("A cat sits on the mat", None),   # the article is not option A
    ("The answer is a cat", None),
    ("B or C", None),                  # commits to two options
    ("I cannot tell", None),
    ("", None),
])
def test_extract_choice(prediction, expected):
    assert extract_choice(prediction, OPTIONS) == expected


def test_mc_accuracy_compares_the_extracted_letter():
    assert mc_accuracy("The answer is (B).", "B", OPTIONS) == (1.0, "B")
    assert mc_accuracy("blue", "B", OPTIONS) == (0.0, "C")
    assert mc_accuracy("E", "B", OPTIONS) == (0.0, None)  # not an offered option


@pytest.mark.parametrize("prediction, answers, source, expected", [
    ("The text says HELLO", ["hello"], "IIIT5K", 1.0),
    ("hel lo", ["hello"], "IIIT5K", 0.0),
    ("x ^ { 2 }", ["x^{2}"], "HME100k", 1.0),   # formulas ignore spaces
    ("X^{2}", ["x^{2}"], "HME100k", 0.0),       # ...but not case
    ("", ["abc"], "IIIT5K", 0.0),
    ("line one\nline two", ["one line"], "FUNSD", 1.0),
])
def test_ocrbench_match(prediction, answers, source, expected):
    assert ocrbench_match(prediction, answers, source) == expected


def test_score_sample_dispatches_and_rejects_unknown_metrics():
    assert score_sample("mc", "(C)", ["C"], OPTIONS) == (1.0, "C")
    assert score_sample("relaxed", "45%", ["0.45"]) == (1.0, "45%")
    with pytest.raises(ValueError):
        score_sample("bleu", "x", ["x"])


def test_samples_without_answers_are_unscored_not_wrong():
    assert score_sample("anls", "0.28", []) == (None, "0.28")
    result = aggregate([{"score": 1.0, "metric": "anls"}, {"score": None, "metric": "anls"}])
    assert (result["n"], result["n_unscored"], result["score"]) == (1, 1, 100.0)


def test_aggregate_circular_groups_and_categories():
    samples = [
        {"score": 1.0, "metric": "mc", "category": "color", "group": "q1"},
        {"score": 1.0, "metric": "mc", "category": "color", "group": "q1"},
        {"score": 0.0, "metric": "mc", "category": "color", "group": "q1"},  # one rotation wrong: q1 fails
        {"score": 1.0, "metric": "mc", "category": "shape", "group": "q2"},
        {"score": 1.0, "metric": "mc", "category": "shape", "group": "q2"},
        {"score": 1.0, "metric": "mc", "category": "shape", "group": ""},
    ]
    result = aggregate(samples)
    assert result["n"] == 3 and result["n_samples"] == 6
    assert result["score"] == pytest.approx(200 / 3)
    assert result["categories"] == {"color": {"n": 1, "score": 0.0}, "shape": {"n": 2, "score": 100.0}}


def test_aggregate_reports_ocrbench_final_score():
    samples = [{"score": s, "metric": "ocrbench", "category": "Regular Text Recognition"} for s in (1, 1, 0)]
    assert aggregate(samples)["final_score"] == 2
