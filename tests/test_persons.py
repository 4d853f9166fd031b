"""Protected-persons matcher: the shipped list, fuzzy forms, layering of takedown names."""

from __future__ import annotations

from pathlib import Path

import pytest

from safety.errors import RulesInvalid
from safety.normalize import normalize
from safety.persons import PersonIndex, load_names
from safety.tokens import tokenize
from safety.wordlist import ordinary_words

PERSONS = Path(__file__).resolve().parents[1] / "configs" / "safety" / "persons.txt"


def names_in(index: PersonIndex, text: str) -> set[str]:
    return {name for _, _, name in index.scan(tokenize(normalize(text)), ordinary_words())}


@pytest.fixture(scope="module")
def index() -> PersonIndex:
    return PersonIndex(["Janet Quincy Exampleton", "Zendaya", "Prince", "Li Na"])


def test_shipped_list_has_at_least_1500_public_figures_and_names_its_source():
    names = load_names(PERSONS)
    assert len(names) >= 1500 and len(set(map(str.lower, names))) == len(names)
    header = PERSONS.read_text(encoding="utf-8").split("\n", 12)[:12]
    assert any("Source:" in line for line in header)


@pytest.mark.parametrize("text", ["janet exampleton", "exampleton janet", "Exampleton, Janet",
                                  "janet quincy exampleton", "janet q. exampleton", "janetexampleton",
                                  "janet examplton", "jenet exampleton", "janetexamplton", "j4n3t 3xampl3t0n"])
def test_name_forms_people_write_are_matched(index, text):
    assert names_in(index, text) == {"Janet Quincy Exampleton"}, text


@pytest.mark.parametrize("text", ["janet", "exampleton", "janet, an exampleton", "janet the exampleton",
                                  "jenet examplton", "prince of persia", "li", "na"])
def test_parts_two_typos_and_ordinary_mononyms_do_not_match(index, text):
    assert names_in(index, text) == set(), text


def test_distinctive_mononyms_match(index):
    assert names_in(index, "zendaya on a red carpet") == {"Zendaya"}


@pytest.mark.parametrize("name", ["Zorvana Quillfeather 517c", "Zorvana Quillfeather 13e9", "Ana Sit Quillfeather",
                                  "Mara of the Quillfeathers"])
def test_a_name_spelled_out_in_full_matches_even_when_its_middle_words_are_short_everyday_words(name):
    """The first/last reading stops at short everyday words ("sit", "ie" once leet-folded, "of"); a name
    that has such words of its own still matches when it is written as it was listed."""
    layered = PersonIndex(["Janet Quincy Exampleton"]).extended([name])
    assert names_in(layered, f"{name}, nude") == {name}
    assert names_in(layered, f"{name.split()[0]} is sitting") == set()


def test_extended_index_layers_new_names_and_leaves_the_base_alone(index):
    extended = index.extended(["Ivo Brandtmeyer"])
    assert names_in(extended, "brandtmeyer ivo") == {"Ivo Brandtmeyer"}
    assert names_in(extended, "janet exampleton") == {"Janet Quincy Exampleton"}
    assert names_in(index, "ivo brandtmeyer") == set()
    assert extended.count == index.count + 1


def test_a_hostile_prompt_of_repeated_name_parts_is_looked_at_once_per_neighbourhood(index):
    text = "janet " * 4000 + "exampleton"
    hits = index.scan(tokenize(normalize(text)), ordinary_words())
    assert {name for *_, name in hits} == {"Janet Quincy Exampleton"}


def test_an_empty_or_missing_list_is_an_error(tmp_path):
    with pytest.raises(RulesInvalid):
        load_names(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("# only a comment\n", encoding="utf-8")
    with pytest.raises(RulesInvalid):
        load_names(tmp_path / "empty.txt")


def test_a_typo_in_both_words_is_found_when_both_are_long():
    index = PersonIndex(["Marjorie Exampleton"])
    assert names_in(index, "marjori exampletom") == {"Marjorie Exampleton"}
    assert names_in(index, "exampletom, marjori") == {"Marjorie Exampleton"}
    # an everyday word one edit from a name part anchors nothing, and a short other word must be exact
    assert names_in(index, "marjori example") == set()
    assert names_in(PersonIndex(["Janet Exampleton"]), "jenet exampletom") == set()
    assert names_in(PersonIndex(["Janet Exampleton"]), "janet exampletom") == {"Janet Exampleton"}
