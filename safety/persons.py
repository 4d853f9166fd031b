"""Protected persons: real people whose names must not be combined with mature content.

The name list (`persons.txt` beside the rules) is compiled by hand from public knowledge of widely
known public figures: actors, musicians, politicians, athletes, streamers, models and other
celebrities from many countries, the kind of names that appear in Wikipedia's lists of famous people
and in Wikidata. It is hand-compiled because no package on the one reachable registry (PyPI) ships
such a list, and the service may not download one at run time. Names approved by takedowns are added
at run time (`PersonIndex.extended`), so the file only needs the widely known base.

Matching is on normalised, leet-folded tokens (see `safety.normalize`), and tolerant the ways people
write names:
- token order: "taylor swift", "swift taylor", "swift, taylor";
- middle names and initials between first and last name: "taylor alison swift", "jane q. example"
  (up to two; a short function word such as "a" or "the" ends the name, and so does punctuation,
  so "taylor, a swift runner" does not match);
- spelled out in full, every word of it, however short its words are;
- written together: "taylorswift";
- one typo (edit distance 1, transpositions included) in a token of 5+ letters, when the other token
  is exact and the whole name has 8+ letters: "scarlet johansson", "taylor swfit", "gal gadott";
  or a typo in both, when both are 6+ letters long and one of them is not an everyday word:
  "scarlet johannson" (but not "jenet examplton").
A first name or a surname alone never matches, and a one-word name (a mononym such as "zendaya")
matches only if it is 6+ letters long and not an ordinary English word (a mononym such as "Prince"
would match every prince; such people are listed under their full names). Read backwards without a
comma, two ordinary words are not a name ("a smith will ..." is not "Will Smith").

Cost: each prompt word is looked up in two dictionaries, and only the words that are name parts are
looked at closely; typos of names written together are found through a deletion neighbourhood
(cached per distinct long word), so an audit stays linear in the prompt length.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import compress, count
from pathlib import Path

from safety.errors import RulesInvalid
from safety.normalize import normalize
from safety.tokens import Tokens, tokenize
from safety.wordlist import ordinary_words

_MIDDLE_MAX = 2  # middle names / initials allowed between first and last name
_BARRIERS = frozenset(",;:()[]{}<>|/\n")  # a name never spans these (except "surname, first")
_FUZZY_MIN_TOKEN = 5
_FUZZY_MIN_NAME = 8
_FUZZY_MIN_WHOLE = 10  # a name written together, with one typo ("taylorswfit")
_FUZZY_MIN_ANCHOR = 6  # a word with a typo that anchors a name whose other word may have one too
_MONONYM_MIN = 6
_FUNCTION_WORD_MAX = 3  # an ordinary word this short ("a", "the", "and") ends a name; longer ones may be middle names
# Particles that sit inside names ("Ana de Armas", "Ursula von der Leyen") although they are short
# everyday words in some language; hand-listed because they are a property of names, not of a lexicon.
_PARTICLES = frozenset({"de", "da", "di", "do", "dos", "das", "del", "della", "van", "von", "der", "den", "la", "le",
                        "du", "bin", "ibn", "al", "el", "ter", "ten", "st", "mc", "y"})
_CACHE_LIMIT = 50_000
_FEW_PARTS = 8  # name parts a prompt may hold before they are sorted out per distinct word


def name_tokens(name: str) -> tuple[str, ...]:
    return tuple(tokenize(normalize(name)).canon)


def _deletes(word: str) -> list[str]:
    return [word[:i] + word[i + 1:] for i in range(len(word))]


def _within_one(a: str, b: str) -> bool:
    """Damerau-Levenshtein distance <= 1."""
    if a == b:
        return True
    la, lb = len(a), len(b)
    if abs(la - lb) > 1 or (a[0] != b[0] and a[-1] != b[-1]):  # one edit keeps the first or the last letter
        return False
    if la == lb:
        diff = [i for i in range(la) if a[i] != b[i]]
        if len(diff) == 1:
            return True
        return len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]]
    if la > lb:
        a, b = b, a
    return any(b[:i] + b[i + 1:] == a for i in range(len(b)))


def load_names(path: Path) -> list[str]:
    """Names from a list file: one per line, `#` starts a comment."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise RulesInvalid(f"{path}: {exc}") from exc
    names = [line.split("#", 1)[0].strip() for line in lines]
    names = [n for n in names if n]
    if not names:
        raise RulesInvalid(f"{path}: no names")
    return names


class PersonIndex:
    """Fuzzy matcher over a list of names; `extended()` layers more names on top cheaply."""

    def __init__(self, names: Iterable[str], base: PersonIndex | None = None):
        self.base = base
        self.names: list[str] = []
        self._whole: dict[str, int] = {}  # "taylorswift", "swifttaylor", mononyms -> name id
        self._pairs: dict[str, list[tuple[int, str, bool]]] = {}  # token -> (id, other token, is_first)
        self._deletes: dict[str, set[str]] = {}  # deletion variant -> names written together (typo lookup)
        # names of 3+ words, spelled out in full, anchored on their longest word: the looser first/last
        # reading stops at short everyday words, which may be a name's own ("Zorvana Sit Quillfeather")
        self._sequences: dict[str, list[tuple[int, tuple[str, ...], int]]] = {}
        self._cache: dict[str, tuple[str, ...]] = {}
        ordinary = ordinary_words()
        for name in names:
            toks = name_tokens(name)
            if not toks:
                continue
            pid = len(self.names)
            self.names.append(name)
            if len(toks) == 1:
                word = toks[0]
                if len(word) >= _MONONYM_MIN and word not in ordinary:
                    self._whole[word] = pid
                continue
            if len(toks) > 2:
                anchor = max(range(len(toks)), key=lambda k: len(toks[k]))
                self._sequences.setdefault(toks[anchor], []).append((pid, toks, anchor))
            first, last = toks[0], toks[-1]
            together = {"".join(toks), last + first, first + last}  # "taylorswift", "swifttaylor"
            for tok in together:
                self._whole[tok] = pid
                if len(tok) >= _FUZZY_MIN_WHOLE:
                    for d in (tok, *_deletes(tok)):
                        self._deletes.setdefault(d, set()).add(tok)
            self._pairs.setdefault(first, []).append((pid, last, True))
            self._pairs.setdefault(last, []).append((pid, first, False))
        # every word that can anchor a match here (name parts of one letter cannot)
        # long first names and surnames by their deletion variants, for `near_parts`
        self._part_deletes: dict[str, set[str]] = {}
        for part in self._pairs:
            if len(part) >= _FUZZY_MIN_ANCHOR - 1:
                for d in (part, *_deletes(part)):
                    self._part_deletes.setdefault(d, set()).add(part)
        self._near: dict[str, tuple[str, ...]] = {}
        self._longest_part = max(map(len, self._pairs), default=0)
        self.keys = (frozenset(self._whole) | frozenset(w for w in self._pairs if len(w) > 1)
                     | frozenset(self._sequences))
        self._longest = max(map(len, self._whole), default=0)  # longer words cannot be a name with one typo
        self.count = len(self.names) + (base.count if base else 0)

    def extended(self, names: Iterable[str]) -> PersonIndex:
        """A new index that also knows `names`; this one is unchanged and shared, not copied."""
        return PersonIndex(names, base=self)

    # -- lookup ------------------------------------------------------------------------------------

    def _layers(self) -> list[PersonIndex]:
        out, layer = [], self
        while layer is not None:
            out.append(layer)
            layer = layer.base
        return out

    def _similar_whole(self, word: str) -> tuple[int, str] | None:
        """A name written together with one typo ("taylorswfit"): (id, name) in this layer."""
        cached = self._cache.get(word)
        if cached is None:
            found: set[str] = set()
            for variant in (word, *_deletes(word)):
                found.update(self._deletes.get(variant, ()))
            cached = tuple(t for t in found if t in self._whole and _within_one(word, t))
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[word] = cached
        return (self._whole[cached[0]], cached[0]) if cached else None

    def scan(self, tokens: Tokens, ordinary: frozenset[str], base_parts: list[int] | None = None,
             base_typos: list[int] | None = None, limit: int | None = None,
             base_fuzzy: list[int] | None = None) -> list[tuple[int, int, str]]:
        """(first word, last word, name) of every protected name in the text (the first `limit` only).

        Every match is anchored on one exactly spelled word (a whole name, a first name or a
        surname), so only the few words that are name parts are looked at closely. `base_parts` and
        `base_typos` list where the bottom layer's `keys` and `may_be_typo` words are, when the caller
        already knows (it looks each distinct word up once and caches the answer)."""
        canon, n = tokens.canon, len(tokens.canon)
        hits: list[tuple[int, int, str]] = []
        reach = _MIDDLE_MAX + 1
        present: _Present | None = None
        for layer in self._layers():
            if not layer.names:
                continue
            whole, pairs, keys = layer._whole, layer._pairs, layer.keys
            parts = base_parts if layer.base is None and base_parts is not None else [
                i for i, w in enumerate(canon) if w in keys]
            sequences = layer._sequences
            if len(parts) > _FEW_PARTS:
                # A hostile prompt repeats name parts whose other half is nowhere in it: each distinct
                # word is asked once what could match it at all, and only those words are looked at.
                present = present or _Present(canon)
                words = present.words
                sequences = {w: seqs for w in {canon[i] for i in parts}
                             if (seqs := [q for q in sequences.get(w, ()) if words.issuperset(q[1])])}
                pairs = {w: entries for w in {canon[i] for i in parts}
                         if (entries := [e for e in pairs.get(w, ()) if present.may_hold(e[1])])}
                parts = [i for i in parts if (w := canon[i]) in whole or w in sequences or w in pairs]
            # A name part repeated all over a hostile prompt is looked at once per distinct
            # neighbourhood: the result depends only on the text around it.
            seen: dict[tuple[tuple[str, ...], int], list[tuple[int, int]]] = {}
            for i in parts:
                if limit is not None and len(hits) >= limit:
                    return hits
                word = canon[i]
                pid = whole.get(word)
                if pid is not None:
                    hits.append((i, i, layer.names[pid]))
                for pid, toks, anchor in sequences.get(word, ()):
                    start = i - anchor
                    if start >= 0 and tuple(canon[start:start + len(toks)]) == toks:
                        hits.append((start, start + len(toks) - 1, layer.names[pid]))
                entries = pairs.get(word)
                if not entries:
                    continue
                lo, hi = max(0, i - reach), min(n - 1, i + reach)
                key = (tokens.piece(lo, hi), i - lo)
                found = seen.get(key)
                if found is None:
                    found = seen[key] = [(pid, j - i) for pid, other, is_first in entries
                                         if (j := _partner(tokens, i, other, is_first, ordinary)) is not None]
                for pid, offset in found:
                    hits.append((min(i, i + offset), max(i, i + offset), layer.names[pid]))
            if not hits and layer._whole:
                typos = base_typos if layer.base is None and base_typos is not None else [
                    i for i, w in enumerate(canon) if layer.may_be_typo(w, ordinary)]
                for i in typos:
                    found = layer._similar_whole(canon[i])
                    if found is not None:
                        hits.append((i, i, layer.names[found[0]]))
            if not hits:
                # a typo in both words ("scarlet johannson"): anchored on a long, unusual word one edit
                # from a name part, the other half found as usual (one typo allowed there too)
                fuzzy = base_fuzzy if layer.base is None and base_fuzzy is not None else [
                    i for i in compress(count(), map((_FUZZY_MIN_ANCHOR - 1).__lt__, map(len, canon)))
                    if layer.near_parts(canon[i], ordinary)]
                for i in fuzzy:
                    for part in layer.near_parts(canon[i], ordinary):
                        for pid, other, is_first in layer._pairs[part]:
                            j = _find_partner(tokens, i, other, is_first, ordinary)
                            # two typos in one name: the other word long enough too ("jenet examplton"
                            # stays apart), else spelled exactly
                            if j is not None and (canon[j] == other or len(other) >= _FUZZY_MIN_ANCHOR):
                                hits.append((min(i, j), max(i, j), layer.names[pid]))
                    if limit is not None and len(hits) >= limit:
                        break
        return hits if limit is None else hits[:limit]

    def near_parts(self, word: str, ordinary: frozenset[str]) -> tuple[str, ...]:
        """First names and surnames of this layer one edit from `word` (not `word` itself), when `word`
        is long, all letters and not an everyday word: the anchor of a name with a typo in both words."""
        if (not _FUZZY_MIN_ANCHOR <= len(word) <= self._longest_part + 1 or not word.isalpha() or word in ordinary
                or word in self._pairs):
            return ()  # a longer word cannot be one edit from a name part (nor cost a deletion per letter)
        cached = self._near.get(word)
        if cached is None:
            found: set[str] = set()
            for variant in (word, *_deletes(word)):
                found.update(self._part_deletes.get(variant, ()))
            cached = tuple(sorted(p for p in found if p != word and _within_one(word, p)))
            if len(self._near) >= _CACHE_LIMIT:
                self._near.clear()
            self._near[word] = cached
        return cached

    def may_be_typo(self, word: str, ordinary: frozenset[str]) -> bool:
        """Whether `word` is worth a typo lookup as a name written together. Names have no digits
        once leetspeak is folded ("t4ylorsw1ft"), so words with digits left ("w26x89") are not."""
        return (_FUZZY_MIN_WHOLE <= len(word) <= self._longest + 1 and word.isalpha() and word not in ordinary
                and self._similar_whole(word) is not None)


class _Present:
    """What words a text holds, for a quick answer to "could `other` be in it, spelled exactly or with
    one typo?" (a typo keeps the first or the last letter and changes the length by one at most)."""

    def __init__(self, canon: list[str]):
        self.words = frozenset(canon)
        self.shapes = {(len(w), w[0]) for w in self.words} | {(-len(w), w[-1]) for w in self.words}

    def may_hold(self, other: str) -> bool:
        if other in self.words:
            return True
        if len(other) < _FUZZY_MIN_TOKEN:
            return False
        size, shapes = len(other), self.shapes
        return any((k, other[0]) in shapes or (-k, other[-1]) in shapes for k in (size - 1, size, size + 1))


def _partner(tokens: Tokens, i: int, other: str, is_first: bool, ordinary: frozenset[str]) -> int | None:
    if len(tokens.canon) > 1 and not _could_be_near(tokens, i, other):
        return None
    return _find_partner(tokens, i, other, is_first, ordinary)


def _could_be_near(tokens: Tokens, i: int, other: str) -> bool:
    """Cheap test whether any word near i could be `other` (same length give or take one)."""
    size = len(other)
    return any(abs(len(w) - size) <= 1 for w in tokens.canon[max(0, i - 1 - _MIDDLE_MAX):i + 2 + _MIDDLE_MAX])


def _find_partner(tokens: Tokens, i: int, other: str, is_first: bool, ordinary: frozenset[str]) -> int | None:
    """Where the other half of a name sits relative to word i (spelled exactly), if it does. The other
    half may have one typo when it is long enough."""
    canon, n = tokens.canon, len(tokens.canon)

    def same(word: str) -> bool:
        return word == other or (len(other) >= _FUZZY_MIN_TOKEN and len(word) + len(canon[i]) >= _FUZZY_MIN_NAME
                                 and _within_one(word, other))

    if is_first:  # "taylor [alison] swift"
        for j in range(i + 1, min(n, i + 2 + _MIDDLE_MAX)):
            if _BARRIERS.intersection(tokens.gap(j - 1)):
                break
            if same(canon[j]):
                return j
            if canon[j] in ordinary and 1 < len(canon[j]) <= _FUNCTION_WORD_MAX and canon[j] not in _PARTICLES:
                break
        return None
    # i is a surname: "swift taylor", "swift, taylor" (first name right after); without the comma
    # two everyday words ("a smith will ...") are not read backwards as a name ...
    gap = tokens.gap(i) if i + 1 < n else ""
    if i + 1 < n and same(canon[i + 1]) and not (_BARRIERS - {","}).intersection(gap) and (
            "," in gap or canon[i] not in ordinary or canon[i + 1] not in ordinary):
        return i + 1
    # ... or "tayler [alison] swift" (a typo in the first name, read from the surname)
    for j in range(i - 1, max(-1, i - 2 - _MIDDLE_MAX), -1):
        if _BARRIERS.intersection(tokens.gap(j)):
            break
        if canon[j] != other and same(canon[j]):
            return j
        if canon[j] in ordinary and 1 < len(canon[j]) <= _FUNCTION_WORD_MAX and canon[j] not in _PARTICLES:
            break
    return None
