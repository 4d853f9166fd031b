"""A1111's prompt grammar: emphasis, escapes, BREAK, prompt editing, alternation, LoRA tags (A1111's own doctests)."""

from __future__ import annotations

import re

import pytest

from genserve.engine.prompt_syntax import (
    BREAK_MARK,
    PromptSyntaxError,
    extract_extra_networks,
    parse_prompt_attention,
    plain_text,
    prompt_schedule,
)


@pytest.mark.parametrize(("text", "expected"), [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("[faint]", [("faint", 1 / 1.1)]),
    ("", [("", 1.0)]),
])
def test_emphasis_as_a1111(text, expected):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


def test_break_splits_and_needs_capitals():
    assert parse_prompt_attention("a BREAK b") == [("a", 1.0), BREAK_MARK, ("b", 1.0)]
    assert parse_prompt_attention("a break b") == [("a break b", 1.0)]
    assert BREAK_MARK in parse_prompt_attention("(a BREAK b:1.2)")


def _norm(schedule):
    return [(end, re.sub(r"\s+", " ", text).strip()) for end, text in schedule]


@pytest.mark.parametrize(("text", "expected"), [
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a"), (10, "a b")]),
    ("a [b: 3]", [(3, "a"), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a"), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b d"), (10, "a c d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c"), (10, "((a][:b:c d")]),
    ("a [cat:dog:0.5] (x:1.2)", [(5, "a cat (x:1.2)"), (10, "a dog (x:1.2)")]),
    ("\\[a:b:3\\]", [(10, "\\[a:b:3\\]")]),
])
def test_prompt_editing_as_a1111(text, expected):
    assert _norm(prompt_schedule(text, 10)) == expected


def test_alternation_changes_every_step():
    assert prompt_schedule("[a|(b:1.1)]", 4) == [(1, "a"), (2, "(b:1.1)"), (3, "a"), (4, "(b:1.1)")]
    assert prompt_schedule("[fe|]male", 3) == [(1, "female"), (2, "male"), (3, "female")]
    assert prompt_schedule("[fe|||]male", 5) == [(1, "female"), (4, "male"), (5, "female")]


def test_lora_tags_are_cut_out_with_a1111_arguments():
    parsed = extract_extra_networks("a cat <lora:style:0.6>, <lora:two:0.3:0.8> <lora:three> <lyco:four:unet=0.5:te=0.2>")
    assert "<" not in parsed.text and "a cat" in parsed.text
    tags = {t.name: (t.strength, t.te_strength) for t in parsed.loras}
    assert tags == {"style": (0.6, 0.6), "two": (0.8, 0.3), "three": (1.0, 1.0), "four": (0.5, 0.2)}
    with pytest.raises(PromptSyntaxError) as err:
        extract_extra_networks("a <hypernet:thing:1>")
    assert err.value.code == "extra_network_unsupported"
    with pytest.raises(PromptSyntaxError) as err:
        extract_extra_networks("a <lora:thing:strong>")
    assert err.value.code == "lora_tag_invalid"


def test_plain_text_keeps_every_word_for_the_audit():
    text = "masterpiece, (red fox:1.3), ((snow)), [cat:dog:5] BREAK [a|b] <lora:style1:0.8> \\(x\\)"
    assert plain_text(text) == "masterpiece, red fox, snow, cat dog a b (x) style1"
