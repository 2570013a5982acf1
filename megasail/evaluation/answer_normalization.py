"""The VQA challenge's answer normalisation (EvalAI's answer processor, as lmms-eval's EvalAIAnswerProcessor).

Steps, in the reference's order: lower-case; drop "," and "?"; split "'s" off its word; newlines
and tabs to spaces; each punctuation mark below is deleted when it touches a space somewhere in the
answer, else replaced by a space; a "." not followed by a digit is deleted; number words become
digits, articles are dropped, apostrophe-less contractions get their apostrophes back.
"""

from __future__ import annotations

import functools
import re

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")  # fmt: skip
# the reference's pattern "(?!<=\d)(\.)(?!\d)" deletes every "." that is not followed by a digit
_PERIOD = re.compile(r"\.(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"(?<=\d),+(?=\d)")
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset(("a", "an", "the"))

# The contractions the reference restores. Its table maps each spelling with exactly one apostrophe
# missing to the full form ("dont" -> "don't"; "couldnt've" and "couldn'tve" -> "couldn't've"), so it
# is built here from the full forms. Left out as the reference does in effect: "she's" and "let's"
# (identity entries there) and the capitalised I'm/I've/I'd've (never reached after lower-casing).
_CONTRACTED_FORMS = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't
he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've
mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't
shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll
someone's something'd something'd've something'll that's there'd there'd've there're there's they'd
they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've
when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've
wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()


def _spellings_missing_one_apostrophe(form: str) -> list[str]:
    return [form[:i] + form[i + 1 :] for i, ch in enumerate(form) if ch == "'"]


CONTRACTIONS = {
    spelling: form for form in _CONTRACTED_FORMS for spelling in _spellings_missing_one_apostrophe(form)
}


def _strip_punctuation(text: str) -> str:
    out = text
    digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in _PUNCTUATION:
        # the test looks at the text as it came in, not as earlier marks left it (as the reference)
        touches_space = (mark + " " in text) or (" " + mark in text)
        out = out.replace(mark, "" if touches_space or digit_comma else " ")
    return _PERIOD.sub("", out)


def _digits_articles_contractions(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


@functools.lru_cache(maxsize=1 << 17)  # annotator answers recur across questions, models and resamples
def normalize_vqa_answer(text: str) -> str:
    """An answer or prediction as the VQA evaluation compares it: "Two dogs." -> "2 dogs"."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles_contractions(_strip_punctuation(text))
