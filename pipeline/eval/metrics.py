"""Per-sample scores, each as its benchmark's own evaluation code computes it.

- VQA accuracy (TextVQA, VQAv2): the EvalAI answer processing applied to the prediction and to every
  human answer, then min(#other humans who gave it / 3, 1) averaged over the ten leave-one-out subsets.
- ANLS (DocVQA): 1 - normalised Levenshtein distance, best over the answers, 0 below the 0.5 threshold.
- Relaxed accuracy (ChartQA): numbers within 5% of the label (percentages read as fractions), exact
  case-insensitive match otherwise.
- Multiple choice (MMBench, AI2D): the option letter extracted from free text, then exact match; with
  circular evaluation a question counts only if every rotation of its options is answered right.
- OCRBench: the lower-cased answer is a substring of the lower-cased prediction; HME100k formulas are
  compared case-sensitively with all spaces removed.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Iterable, Sequence

METRICS = ("vqa", "anls", "relaxed", "mc", "ocrbench")

# -- VQA accuracy ----------------------------------------------------------------------------------------------

# The canonical spellings of the contractions the VQA evaluation repairs. Any spelling that drops exactly one
# of the apostrophes maps back to the canonical one ("dont" -> "don't", "hed've" and "he'dve" -> "he'd've").
# First-person forms are absent on purpose: the official table keys them capitalised ("Im"), and since the
# text is lower-cased first they never apply.
_CONTRACTIONS = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd he'd've
he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've needn't not've
o'clock oughtn't 'ow's'at shan't she'd've shouldn't shouldn't've should've somebody'd somebody'd've somebody'll
somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll that's there'd
there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll
what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's
won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()


def _contraction_table() -> dict[str, str]:
    table = {}
    for canonical in _CONTRACTIONS:
        for i, ch in enumerate(canonical):
            if ch == "'":
                table[canonical[:i] + canonical[i + 1:]] = canonical
    return table


CONTRACTIONS = _contraction_table()
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
VQA_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                   ",", "?", "!"]
_COMMA_BETWEEN_DIGITS = re.compile(r"(?<=\d),+(?=\d)")
# The official pattern meant "a period not between digits" but its look-behind is malformed, so what it
# really removes is every period not followed by a digit ("2." -> "2", "3.5" stays, "u.s." -> "us").
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")


def normalize_vqa_answer(text: str) -> str:
    """The EvalAI answer processor used by the TextVQA and VQAv2 evaluation servers."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _strip_punctuation(text)
    words = [NUMBER_WORDS.get(w, w) for w in text.split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def _strip_punctuation(text: str) -> str:
    # A mark touching a space (or any text with a digit-grouping comma) is deleted; one inside a word
    # becomes a space, so "black-and-white" and "black and white" agree.
    out = text
    glued_ok = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in VQA_PUNCTUATION:
        if p + " " in text or " " + p in text or glued_ok:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The official call passes re.UNICODE (= 32) as the count argument, which caps removals at 32.
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=32)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Soft accuracy against the human answers (usually ten)."""
    if not answers:
        return 0.0
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in answers]
    total = 0.0
    for held_out in range(len(gts)):
        matches = sum(1 for j, g in enumerate(gts) if j != held_out and g == pred)
        total += min(1.0, matches / 3.0)
    return total / len(gts)


# -- ANLS --------------------------------------------------------------------------------------------------------

def levenshtein(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """DocVQA's average normalised Levenshtein similarity for one question."""
    if not answers:
        return 0.0
    pred = " ".join(prediction.strip().lower().split())
    distances = []
    for answer in answers:
        gt = " ".join(answer.strip().lower().split())
        # The official code divides by the longer of the raw (unnormalised) strings; kept for comparability.
        length = max(len(answer), len(prediction))
        distances.append(0.0 if length == 0 else levenshtein(gt, pred) / length)
    similarity = 1.0 - min(distances)
    return similarity if similarity >= threshold else 0.0


# -- relaxed accuracy -----------------------------------------------------------------------------------------

def _to_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(prediction: str, target: str, tolerance: float = 0.05) -> bool:
    prediction, target = prediction.strip(), target.strip()
    p, t = _to_float(prediction), _to_float(target)
    # A zero target has no relative error, so it falls back to string equality like the reference does.
    if p is not None and t:
        return abs(p - t) / abs(t) <= tolerance
    return prediction.lower() == target.lower()


def relaxed_accuracy(prediction: str, answers: Sequence[str], tolerance: float = 0.05) -> float:
    return float(any(relaxed_correctness(prediction, a, tolerance) for a in answers))


# -- multiple choice ------------------------------------------------------------------------------------------

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Only the keyword is case-insensitive: a lower-case "a" after "answer is" is an article, not option A.
_ANSWER_IS = re.compile(r"(?i:answer)\s*(?:(?i:is)|:)?\s*[:：]?\s*\(?\s*([A-Z])(?:\s*\))?(?![A-Za-z])")
_BARE_LETTER = re.compile(r"^\s*[(\[]?\s*([A-Z])\s*[)\].:]?\s*$")
_LEADING_LETTER = re.compile(r"^\s*[(\[]?([A-Z])[)\].:]\s+\S")


def extract_choice(prediction: str, options: Sequence[str]) -> str | None:
    """The option letter a free-text answer commits to, or None when it commits to none or several."""
    letters = LETTERS[:len(options)]
    for pattern in (_BARE_LETTER, _ANSWER_IS, _LEADING_LETTER):
        m = pattern.search(prediction)
        if m and m.group(1).upper() in letters:
            return m.group(1).upper()
    tokens = re.sub(r"[.,:;!?()\[\]{}*#\"']", " ", prediction).split()
    named = {t for t in tokens if t in letters}
    # "A" is also the article: in a sentence it names option A only when no other letter is named.
    if len(named) == 1:
        letter = next(iter(named))
        if letter != "A" or len(tokens) <= 3:
            return letter
    return _choice_by_text(prediction, options, letters)


def _choice_by_text(prediction: str, options: Sequence[str], letters: str) -> str | None:
    text = prediction.lower()
    found = [(letter, str(o).strip().lower()) for letter, o in zip(letters, options)
             if str(o).strip() and str(o).strip().lower() in text]
    if not found:
        return None
    # An option that is a substring of another matched one ("red" in "dark red") yields to the longer one.
    found = [(l, o) for l, o in found if not any(o != other and o in other for _, other in found)]
    return found[0][0] if len(found) == 1 else None


def mc_accuracy(prediction: str, answer: str, options: Sequence[str]) -> tuple[float, str | None]:
    choice = extract_choice(prediction, options)
    return float(choice is not None and choice == answer.strip().upper()), choice


# -- OCRBench ------------------------------------------------------------------------------------------------

def ocrbench_match(prediction: str, answers: Sequence[str], dataset_name: str = "") -> float:
    if dataset_name == "HME100k":
        pred = prediction.strip().replace("\n", " ").replace(" ", "")
        return float(any(a.strip().replace("\n", " ").replace(" ", "") in pred for a in answers))
    pred = prediction.lower().strip().replace("\n", " ")
    return float(any(a.lower().strip().replace("\n", " ") in pred for a in answers))


# -- one sample, one suite ------------------------------------------------------------------------------------

def score_sample(metric: str, prediction: str, answers: Sequence[str], options: Sequence[str] = (),
                 source: str = "") -> tuple[float | None, str]:
    """(score in [0, 1], the answer that was scored: the extracted letter for multiple choice).

    The score is None for a sample without answers (a test split scored by its benchmark's server).
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    if not answers:
        return None, prediction
    if metric == "vqa":
        return vqa_accuracy(prediction, answers), prediction
    if metric == "anls":
        return anls(prediction, answers), prediction
    if metric == "relaxed":
        return relaxed_accuracy(prediction, answers), prediction
    if metric == "mc":
        score, choice = mc_accuracy(prediction, answers[0] if answers else "", options)
        return score, choice or ""
    return ocrbench_match(prediction, answers, source), prediction


def aggregate(samples: Iterable[dict]) -> dict:
    """Suite summary from scored samples (each with score, metric, category, and group for circular MC).

    `score` is the mean in percent. Samples sharing a non-empty `group` are the rotations of one circular
    multiple-choice question and count once, as right only if all of them are. Samples whose score is
    None (no answers to score against) are counted in `n_unscored` and left out of the scores.
    """
    all_samples = list(samples)
    samples = [s for s in all_samples if s["score"] is not None]
    units: dict[str, list[dict]] = defaultdict(list)
    for i, s in enumerate(samples):
        units[s.get("group") or f"#{i}"].append(s)
    per_unit = [(group[0].get("category", ""), min(s["score"] for s in group)) for group in units.values()]
    by_category: dict[str, list[float]] = defaultdict(list)
    for category, score in per_unit:
        by_category[category or "all"].append(score)
    n = len(per_unit)
    result = {
        "n": n,
        "n_samples": len(samples),
        "n_unscored": len(all_samples) - len(samples),
        "score": 100.0 * sum(s for _, s in per_unit) / n if n else 0.0,
        "categories": {c: {"n": len(v), "score": 100.0 * sum(v) / len(v)} for c, v in sorted(by_category.items())},
    }
    if samples and all(s.get("metric") == "ocrbench" for s in samples):
        result["final_score"] = sum(s for _, s in per_unit)  # OCRBench reports correct answers out of 1000
    return result


def retention(student: float | None, teacher: float | None) -> float | None:
    """Student accuracy over teacher accuracy; None when either is missing or the teacher scores zero
    (nothing to retain)."""
    if student is None or not teacher:
        return None
    return round(student / teacher, 4)
