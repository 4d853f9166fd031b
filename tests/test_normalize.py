"""Normalisation and tokenisation: what obfuscations fold to, and spans back into the original text."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safety.normalize import canonical, normalize
from safety.tokens import tokenize


def words(text: str) -> list[str]:
    return tokenize(normalize(text)).canon


def test_unicode_folding():
    assert normalize("ＮＵＤＥ").text == "nude"  # full-width
    assert normalize("nudе").text == "nude"  # Cyrillic е
    assert normalize("νυδε").text.startswith("vu")  # Greek look-alikes map letter by letter
    assert normalize("Café Ünïcode").text == "cafe unicode"  # diacritics
    assert normalize("te\u200ben\u2060\ufeff").text == "teen"  # zero-width characters vanish
    assert normalize("a\u00a0b").text == "a b"  # no-break space is a space


def test_leet_classes():
    assert canonical("t33n") == canonical("teen")
    assert canonical("1oli") == canonical("loli") == canonical("ioii")
    assert words("$3xy @ss") == words("sexy ass")
    assert canonical("4057") == "aost"


def test_separators_and_runs():
    toks = tokenize(normalize("xx t.e.e.n yy"))
    assert [toks.canon[i] for i in toks.runs[0]] == ["t", "e", "e", "n"]
    assert tokenize(normalize("t e  e   n")).runs == [[0, 1, 2, 3]]
    assert tokenize(normalize("t    e")).runs == []  # too far apart


def test_numbers_weights_and_glued_digits():
    toks = tokenize(normalize("(girl:1.3), 15yo, 7een, 12345"))
    assert toks.canon[:3] == ["giri", "i", "e"]
    assert 1 not in toks.numbers and 2 not in toks.numbers  # 1.3 is a weight, not two numbers
    i15 = toks.canon.index("is")
    assert toks.numbers[i15] == 15 and toks.canon[i15 + 1] == "yo"
    assert toks.joined[i15] == "isyo"
    assert "teen" in toks.joined.values()
    assert 12345 not in toks.numbers.values()


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab1 .-_ＴｅÉé\u200bеαﬁ①")), max_size=40))
def test_spans_map_back_to_original_text(text):
    norm = normalize(text)
    toks = tokenize(norm)
    assert len(norm.text) == (len(norm.origin) if norm.origin is not None else len(text))
    for i in range(len(toks.canon)):
        a, b = toks.span(i)
        start, end = norm.span(a, b)
        assert 0 <= start < end <= len(text)
        # The original slice normalises back to (at least) the word itself.
        assert normalize(text[start:end]).text.replace(" ", "").find(norm.text[a:b]) >= 0


@pytest.mark.parametrize("text", [
    "🅽🆄🅳🅴",  # negative squared
    "🄽🅄🄳🄴",  # squared
    "ⓝⓤⓓⓔ",  # circled
    "⒩⒰⒟⒠",  # parenthesised
    "🇳🇺🇩🇪",  # regional indicators
    "ɴᴜᴅᴇ",  # small capitals
    "𝓷𝓾𝓭𝓮",  # mathematical script
    "𝖓𝖚𝖉𝖊",  # mathematical fraktur
    "ｎｕｄｅ",  # full width
    "ոսԁе",  # Armenian and Cyrillic look-alikes (TR39)
    "ꓠꓴꓓꓰ",  # Lisu look-alikes (TR39)
    "ΝUDΕ",  # Greek capitals
])
def test_enclosed_styled_and_foreign_look_alike_letters_fold_to_latin(text):
    assert words(text) == ["nude"], text


@pytest.mark.parametrize("text", [
    "nu\ufe0fde",  # variation selector
    "nu\U000e0041de",  # tag character
    "nu\u200dde",  # zero-width joiner
    "n\u0336u\u0336d\u0336e\u0336",  # combining strike-through
    "nu\u00adde",  # soft hyphen
])
def test_invisible_marks_inside_a_word_do_not_split_it(text):
    assert words(text) == ["nude"], ascii(text)


def test_lower_case_letters_whose_capital_is_a_look_alike_fold_too():
    # TR39 lists Cyrillic "К" and "Т" only as capitals; their small forms fold through them.
    assert words("кіт") == ["kit"]
    assert words("тееn") == ["teen"]


def test_native_script_words_keep_their_own_form():
    toks = tokenize(normalize("14 лет"))
    assert toks.native[1] == "лет" and toks.canon[1] != "лет"


def test_emoji_standing_for_a_child_become_a_word():
    assert "chiid" in words("nude 👧🏻")  # leet-folded "child"; the skin tone is dropped
    assert words("🚸") == ["chiid"]


def test_spanish_enye_is_kept_apart_from_n():
    assert words("niña") != words("nina")
    assert words("NIÑA") == words("niña")


def test_symbols_inside_words_read_as_letters_only_between_letters():
    assert words("ch!ld nud€") == words("child nude")
    assert words("wow! 5€") == ["wow", "s"]


def test_cjk_words_are_listed_for_substring_matching():
    toks = tokenize(normalize("十四歳の少女 and text"))
    assert toks.cjk == [0]


def test_spans_far_into_a_long_folded_text_map_back_exactly():
    text = "ﬁé\u200b" * 400 + " ｎｕｄｅ " + "ß" * 300 + " tееn"
    norm = normalize(text)
    toks = tokenize(norm)
    for i in (toks.canon.index("nude"), toks.canon.index("teen")):
        start, end = norm.span(*toks.span(i))
        assert text[start:end] in ("ｎｕｄｅ", "tееn")


def _reference_weights(toks) -> frozenset[int]:
    """The weights as the regex defines them, mapped to words by their offsets (the slow, plain way)."""
    from bisect import bisect_left

    from safety.tokens import _WEIGHT_RE

    out, offsets, n = set(), toks.offsets, len(toks.canon)
    for m in _WEIGHT_RE.finditer(toks.text):
        a, b = m.span(1)
        k = bisect_left(offsets, a)
        i = (k - 1) // 2 if k % 2 == 1 and offsets[k] == a else None
        while i is not None and i < n and offsets[2 * i + 1] < b:
            out.add(i)
            i += 1
    return frozenset(out)


def _reference_runs(toks) -> list[list[int]]:
    """Runs of one-character words 1-3 separators apart, word by word."""
    runs, run = [], []
    words = [toks.text[a:b] for a, b in map(toks.span, range(len(toks.canon)))]
    for i, w in enumerate(words):
        if len(w) != 1:
            continue
        if run and run[-1] == i - 1 and 0 < len(toks.gap(i - 1)) <= 3:
            run.append(i)
            continue
        if len(run) > 2 or (len(run) == 2 and not (words[run[0]] + words[run[1]]).isdecimal()):
            runs.append(run)
        run = [i]
    if len(run) > 2 or (len(run) == 2 and not (words[run[0]] + words[run[1]]).isdecimal()):
        runs.append(run)
    return runs


def _reference_numbers(toks) -> dict[int, int]:
    words = [toks.text[a:b] for a, b in map(toks.span, range(len(toks.canon)))]
    out = {}
    for i, w in enumerate(words):
        if not w.isdecimal() or len(w) > 4:
            continue
        after, before = (toks.gap(i) if i + 1 < len(words) else None), (toks.gap(i - 1) if i else None)
        if (after in (".", ",") and words[i + 1][:1].isdecimal()) or (before in (".", ",")
                                                                        and words[i - 1][-1:].isdecimal()):
            continue
        out[i] = int(w)
    return out


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab1 3.:()]>-+\t\n5,_ｅ")), max_size=30))
def test_weights_runs_and_numbers_read_off_the_words_match_their_plain_definitions(text):
    # The tokenizer finds these with regexes over the whole text and maps over the words (fast on
    # 20,000-character prompts); the plain definitions walk the words one by one.
    toks = tokenize(normalize(text))
    assert toks.weights == _reference_weights(toks), text
    assert toks.runs == _reference_runs(toks), text
    assert toks.numbers == _reference_numbers(toks), text


def test_long_prompts_full_of_weights_and_glued_digits_still_match_the_plain_definitions():
    # Past a few dozen links the tokenizer drops lone digit pairs in bulk; past a few hundred one-character
    # words it uses a regex: both must agree with the word-by-word reading.
    for text in ["(little:1.3) 15yo t e e n, " * 120, "a.b 1 2 x (y:0.5) " * 200, "n u d e (q:1.2)" * 150]:
        toks = tokenize(normalize(text))
        assert toks.runs == _reference_runs(toks)
        assert toks.weights == _reference_weights(toks)
        assert toks.numbers == _reference_numbers(toks)
