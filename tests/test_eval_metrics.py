"""Each metric on cases checked by hand against its published definition (expected values are written out,
never computed by the code under test)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megasail.evaluation import (
    BenchmarkItem,
    anls_similarity,
    average_score,
    extract_choice,
    mme_label,
    ocrbench_hit,
    pope_label,
    score_benchmark,
    vqa_accuracy,
)
from megasail.evaluation.answer_normalization import normalize_vqa_answer
from megasail.evaluation.items import MME_CATEGORIES, OCRBENCH_HME
from megasail.evaluation.metrics import levenshtein


def item(i, answers, **kw):
    return BenchmarkItem(id=str(i), images=[], question="q", answers=answers, **kw)


# ---- vqa ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "matching, expected",
    [
        (3, (3 * 2 / 3 + 7 * 1) / 10),  # 0.9: leaving out a match leaves 2 of 3
        (1, (1 * 0 + 9 * 1 / 3) / 10),  # 0.3
        (2, (2 * 1 / 3 + 8 * 2 / 3) / 10),  # 0.6
        (4, 1.0),
        (0, 0.0),
    ],
)
def test_vqa_leaves_each_answer_out_in_turn(matching, expected):
    """10 answers, `matching` of them equal to the prediction.

    Fault caught: min(1, matches / 3) without leaving each answer out (3 matches would give 1.0, 2 give 0.667).
    """
    answers = ["red"] * matching + ["blue"] * (10 - matching)
    assert vqa_accuracy("red", answers) == pytest.approx(expected)


@pytest.mark.parametrize(
    "prediction, answer",
    [
        ("Two dogs.", "2 dogs"),  # number word, final period, case
        ("The cat!", "cat"),  # article, "!" becomes a space
        ("dont", "don't"),  # contraction restored
        ("t-shirt", "t shirt"),  # "-" not touching a space becomes a space
        ("10,000", "10000"),  # commas dropped
        ("yes\n", "Yes"),
    ],
)
def test_vqa_normalises_answer_and_prediction(prediction, answer):
    """Fault caught: normalisation off (raw strings compared: every pair here scores 0)."""
    assert vqa_accuracy(prediction, [answer] * 10) == 1.0


def test_vqa_normalisation_steps_as_the_reference():
    """Hand-applied EvalAI steps.

    Fault caught: every period deleted (3.5 -> 35); the space test made per occurrence instead of on the
    whole answer ("x-ray -": the lone "-" touches a space, so every "-" is deleted); "'s" not split off;
    contractions missing two apostrophes rewritten (the reference maps only spellings missing one).
    """
    assert normalize_vqa_answer("3.5") == "3.5"
    assert vqa_accuracy("3.5", ["35"] * 10) == 0.0
    assert normalize_vqa_answer("x-ray") == "x ray"
    assert normalize_vqa_answer("x-ray -") == "xray"
    assert normalize_vqa_answer("The man's hat") == "man 's hat"
    assert normalize_vqa_answer("couldnt've") == "couldn't've"
    assert normalize_vqa_answer("couldntve") == "couldntve"
    assert normalize_vqa_answer("someone") == "someone"  # number words are whole words only


# ---- anls ---------------------------------------------------------------------------------------


def test_levenshtein_known_distances():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("flaw", "lawn") == 2


def test_anls_threshold_is_strict():
    """NL = 2/4 = 0.5 exactly scores 0. Fault caught: threshold at <= (would give 0.5)."""
    assert anls_similarity("abxy", ["abcd"]) == 0.0
    assert anls_similarity("abcx", ["abcd"]) == pytest.approx(0.75)  # NL 1/4


def test_anls_divides_by_the_longer_string():
    """distance 2 over the prediction's 8 characters. Fault caught: dividing by the answer's length (2/6)."""
    assert anls_similarity("abcdefgh", ["abcdef"]) == pytest.approx(1 - 2 / 8)


def test_anls_case_whitespace_and_best_answer():
    """Fault caught: the first answer only or the mean over answers (0 or 0.375 instead of 0.75); case or
    whitespace runs counted as edits."""
    assert anls_similarity("abcd", ["zzzz", "abcx"]) == pytest.approx(0.75)
    assert anls_similarity(" ABCD ", ["abcd"]) == 1.0
    assert anls_similarity("a   b", ["a b"]) == 1.0


@settings(max_examples=300, deadline=None)
@given(st.text("abc ", max_size=12), st.lists(st.text("abC", max_size=12), min_size=1, max_size=3))
def test_anls_matches_its_definition_on_any_strings(prediction, answers):
    """The definition spelled out with the (separately checked) edit distance, on short random strings.

    Fault caught: the length-gap shortcut (skipping answers too far apart in length to score) measured
    against the answer's length instead of the longer string's.
    """
    guess = " ".join(prediction.lower().split())
    expected = 0.0
    for answer in answers:
        truth = " ".join(answer.lower().split())
        longer = max(len(guess), len(truth))
        nl = levenshtein(guess, truth) / longer if longer else 0.0
        expected = max(expected, 1 - nl if nl < 0.5 else 0.0)
    assert anls_similarity(prediction, answers) == pytest.approx(expected)


def test_anls_benchmark_is_mean_times_100():
    items = [item(1, ["abcd"]), item(2, ["abcd"])]
    result = score_benchmark(("anls", items), {"1": "abcx", "2": "wxyz"})
    assert result["score"] == pytest.approx(100 * (0.75 + 0.0) / 2)
    assert result["n"] == 2 and result["missing"] == 0


# ---- multiple choice ----------------------------------------------------------------------------

COLOURS = {"A": "red", "B": "blue", "C": "green", "D": "yellow"}


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("B", "B"),
        ("(B) blue", "B"),
        ("The answer is C.", "C"),
        ("**D**", "D"),
        ("B. B is right", "B"),  # one letter, said twice
        ("blue", "B"),  # no letter: the option text
        ("It is Yellow", "D"),  # text, case-insensitive
        ("b", None),  # a lower-case letter is not a choice
        ("A or B", None),  # two letters
        ("red or blue", None),  # two texts
        ("purple", None),
    ],
)
def test_choice_extraction(prediction, expected):
    """Fault caught: lower-case letters accepted ("b"); the first of several letters taken ("A or B");
    a case-sensitive text match ("Yellow"); punctuation kept around the letter ("(B)", "**D**")."""
    assert extract_choice(prediction, COLOURS) == expected


def test_choice_letter_must_be_an_option():
    """Fault caught: any capital letter accepted (C is not an option here)."""
    assert extract_choice("C", {"A": "cat", "B": "dog"}) is None


def test_circular_group_counts_only_when_every_rotation_is_right():
    """Two questions, four rotations each; the second misses one rotation: 1 of 2 groups = 50.

    Fault caught: circular groups ignored (7 of 8 questions = 87.5).
    """
    letters = "ABCD"
    items = [item(f"{g}{r}", [letters[r]], options=COLOURS, group=g) for g in ("p", "q") for r in range(4)]
    predictions = {f"p{r}": letters[r] for r in range(4)}
    predictions |= {"q0": "A", "q1": "B", "q2": "C", "q3": "A"}
    result = score_benchmark(("mc", items), predictions)
    assert result["score"] == 50.0
    assert result["groups"] == 2
    assert result["question_accuracy"] == 87.5


def test_missing_prediction_is_wrong_and_counted():
    """Fault caught: a missing prediction skipped (the score would be 100 over the one answered)."""
    items = [item(1, ["A"], options=COLOURS), item(2, ["B"], options=COLOURS)]
    result = score_benchmark(("mc", items), {"1": "A"})
    assert result["score"] == 50.0 and result["missing"] == 1 and result["n"] == 2


# ---- pope ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("Yes, there is a dog.", "yes"),
        ("No, there is not.", "no"),
        ("There is not a dog in the image", "no"),
        ("Yes. There is no cat.", "yes"),  # only the first sentence decides
        ("I think no, there isn't", "no"),  # commas removed before splitting
        ("None", "yes"),
        ("NO", "yes"),  # the reference's words are No, no, not
    ],
)
def test_pope_label(prediction, expected):
    """Fault caught: the whole answer scanned ("Yes. There is no cat." -> no); commas kept ("no," missed)."""
    assert pope_label(prediction) == expected


def test_pope_counts_and_yes_ratio_of_predictions():
    """truth yes yes no no no, predictions yes yes yes yes no: TP 2, FP 2, TN 1, FN 0.

    Fault caught: yes_ratio from the ground truth (40 instead of 80); precision and recall swapped.
    """
    truth = ["yes", "yes", "no", "no", "no"]
    said = ["Yes", "Yes, it is.", "Yes", "yes", "No"]
    items = [item(i, [t]) for i, t in enumerate(truth)]
    result = score_benchmark(("pope", items), {str(i): s for i, s in enumerate(said)})
    assert result["score"] == pytest.approx(100 * 3 / 5)
    assert result["precision"] == pytest.approx(100 * 2 / 4)
    assert result["recall"] == pytest.approx(100 * 2 / 2)
    assert result["f1"] == pytest.approx(100 * 2 * 0.5 * 1.0 / 1.5)
    assert result["yes_ratio"] == pytest.approx(100 * 4 / 5)


# ---- mme ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("Yes", "yes"),
        ("No.", "no"),
        ("yes, it is", "yes"),
        ("not really", "no"),  # "no" inside the first 4 characters
        ("There is a dog", "other"),
        ("The answer is yes", "other"),  # past the first 4 characters
    ],
)
def test_mme_label(prediction, expected):
    """Fault caught: the whole prediction searched ("The answer is yes" -> yes)."""
    assert mme_label(prediction) == expected


def test_mme_acc_plus_is_per_image():
    """existence: image 1 both right, image 2 one of two -> acc 75 + acc+ 50 = 125; code_reasoning:
    one image, one of two -> 50 + 0 = 50. The pairs are not adjacent in the file.

    Fault caught: acc+ per question instead of per image (existence 150, code_reasoning 100).
    """
    rows = [  # (id, category, image, truth, prediction)
        ("1", "existence", "img1", "yes", "Yes"),
        ("2", "existence", "img2", "yes", "Yes"),
        ("3", "existence", "img1", "no", "No"),
        ("4", "existence", "img2", "no", "Yes"),
        ("5", "code_reasoning", "img3", "yes", "No"),
        ("6", "code_reasoning", "img3", "no", "No"),
    ]
    items = [item(i, [t], category=c, group=g) for i, c, g, t, _ in rows]
    result = score_benchmark(("mme", items), {i: p for i, _, _, _, p in rows})
    assert result["per_category"]["existence"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0}
    assert result["per_category"]["code_reasoning"] == {"acc": 50.0, "acc_plus": 0.0, "score": 50.0}
    assert result["perception"] == 125.0 and result["cognition"] == 50.0
    assert result["score"] == 175.0


# ---- ocrbench -----------------------------------------------------------------------------------


def test_ocrbench_substring_lower_case():
    assert ocrbench_hit("The sign says HELLO World.", ["hello world"], "Scene Text-centric VQA")
    assert not ocrbench_hit("hello", ["hello world"], "Regular Text Recognition")


def test_ocrbench_handwritten_math_removes_spaces_keeps_case():
    """Fault caught: the HME rule not applied (spaces kept) or lower-casing applied to it."""
    assert ocrbench_hit("x^{2}+1", ["x ^ { 2 } + 1"], OCRBENCH_HME)
    assert not ocrbench_hit("X^{2}+1", ["x ^ { 2 } + 1"], OCRBENCH_HME)
    assert not ocrbench_hit("x^{2}+1", ["x ^ { 2 } + 1"], "Regular Text Recognition")


def test_ocrbench_score_is_hits():
    items = [
        item(1, ["cat"], category="Regular Text Recognition"),
        item(2, ["dog"], category="Regular Text Recognition"),
        item(3, ["a b"], category=OCRBENCH_HME),
    ]
    result = score_benchmark(("ocrbench", items), {"1": "CAT", "2": "cow", "3": "ab"})
    assert result["score"] == 2
    assert result["per_category"] == {"Regular Text Recognition": 1, OCRBENCH_HME: 1}


# ---- average ------------------------------------------------------------------------------------


def test_average_normalises_mme_and_ocrbench():
    """(80 + 1400/28 + 600/1000 x 100) / 3 = (80 + 50 + 60) / 3.

    Fault caught: mme or ocrbench averaged on their own scales (1400 points, 600 hits).
    """
    scores = {
        "textvqa": {"metric": "vqa", "n": 10, "score": 80.0},
        "mme": {"metric": "mme", "n": 2374, "score": 1400.0, "per_category": dict.fromkeys(MME_CATEGORIES)},
        "ocrbench": {"metric": "ocrbench", "n": 1000, "score": 600},
    }
    assert average_score(scores) == pytest.approx((80 + 50 + 60) / 3)
