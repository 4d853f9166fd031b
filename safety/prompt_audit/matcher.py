"""The prompt audit's compiled matcher: the term index (one cached lookup per distinct word gives its
rule groups and the flags other layers read: age cue, number word, name part), Aho-Corasick runs and
split-word joins. The age parser that reads those flags is `safety.prompt_audit.ages`.

A little past 450 lines on purpose: the term index is one table read once per distinct word by every
layer (terms, runs, joins, flags); split across modules, each part would reach into the others' state.
The small Aho-Corasick automaton is kept here rather than taken from pyahocorasick: it runs only on
the letters of spaced-out runs, which are short, and it yields this index's own group tuples directly.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import compress, count, repeat
from operator import add, getitem, is_not, itemgetter, mul, not_
from typing import Literal

from safety.normalize import (
    has_long_repeat,
    is_cjk,
    shorten_repeats,
    squeeze,
)
from safety.prompt_audit.rules import _HITS_PER_GROUP, _phrase_tokens
from safety.tokens import Tokens
from safety.verdict import Action

# ---------------------------------------------------------------------------------------------
# Compiled matcher


@dataclass(frozen=True, eq=False)
class _Group:
    """One compiled rule: what a hit means."""

    id: str
    message: str
    signals: tuple[str, ...]
    action: Action | None
    when: frozenset[str]
    fields: frozenset[str]
    role: Literal["term", "benign", "young_adj", "young_noun", "negation", "garment", "removal"] = "term"
    weak: bool = False
    quiet: bool = False
    min_hits: int = 1
    except_near: frozenset[str] = frozenset()
    except_before: tuple[tuple[str, ...], ...] = ()
    near_window: int = 3

    @functools.cached_property
    def cancellable(self) -> bool:
        return bool(self.except_near or self.except_before)

    @functools.cached_property
    def except_before_by_last(self) -> dict[str, list[tuple[str, ...]]]:
        """`except_before` phrases by their last word: one lookup per word before a hit."""
        out: dict[str, list[tuple[str, ...]]] = {}
        for phrase in self.except_before:
            out.setdefault(phrase[-1], []).append(phrase)
        return out


class _AhoCorasick:
    """Substring automaton over canonical terms, used on the letters of spaced-out runs ("t e e n")."""

    def __init__(self, patterns: dict[str, tuple[int, ...]]):
        goto: list[dict[str, int]] = [{}]
        out: list[list[tuple[int, tuple[int, ...]]]] = [[]]
        for word, groups in patterns.items():
            node = 0
            for ch in word:
                nxt = goto[node].get(ch)
                if nxt is None:
                    goto.append({})
                    out.append([])
                    nxt = len(goto) - 1
                    goto[node][ch] = nxt
                node = nxt
            out[node].append((len(word), groups))
        fail = [0] * len(goto)
        queue = list(goto[0].values())
        for node in queue:
            for ch, nxt in goto[node].items():
                queue.append(nxt)
                f = fail[node]
                while f and ch not in goto[f]:
                    f = fail[f]
                cand = goto[f].get(ch, 0)
                fail[nxt] = cand if cand != nxt else 0
                out[nxt] = out[nxt] + out[fail[nxt]]
        self._goto, self._fail, self._out = goto, fail, out

    def finditer(self, text: str) -> Iterable[tuple[int, int, tuple[int, ...]]]:
        """(start, end, groups) of every pattern occurrence; linear in len(text) plus matches."""
        goto, fail, out = self._goto, self._fail, self._out
        node = 0
        for i, ch in enumerate(text):
            while node and ch not in goto[node]:
                node = fail[node]
            node = goto[node].get(ch, 0)
            for length, groups in out[node]:
                yield i + 1 - length, i + 1, groups


_EMPTY: tuple = ()
_NO_PHRASES: dict = {}
_NOTHING: tuple = ((), _NO_PHRASES, 0)  # lookup result of a word that matches nothing

# What else a word is, besides a term: looked up once per distinct word together with the terms, so
# the other layers visit only the few words that concern them.
JOIN_START = 1  # the beginning of a one-word term ("nu" of "nude"): pieces may be joined from here
AGE_CUE = 2  # a word that says a nearby number is an age ("years", "aged", "歳")
NUMBER_WORD = 4  # "thirteen", "treize", "열세"
NAME_PART = 8  # a first name, surname or whole name on the protected-persons list
NAME_TYPO = 16  # a protected name written together with one typo ("taylorswfit")
NAME_FUZZY = 32  # one typo away from a first name or surname ("johannson")
_CACHE_LIMIT = 50_000
_BULK_MIN_WORDS = 64  # this many places of at most _BULK_MAX_TERMS distinct terms: read per term
_BULK_MAX_TERMS = 16
_RUN_CHUNK = 128  # letters of a spaced-out run read at a time (see `_TermIndex._run_matches`)
_JOIN_MAX_PIECES = 4
_JOIN_BATCH = 256
_JOIN_FEW = 32
_SHORT_WORDS = 128  # up to this many words a prompt is read word by word
_FEW_DISTINCT = 64  # distinct words of a prompt few enough to try every pair of them
_JOIN_GAPS = frozenset({" ", ".", "-", "_", "·", "'", "*", "~", "+", "|", "/"})


class Flagged:
    """Where the words with a flag (JOIN_START, AGE_CUE, ...) are, worked out per flag on first use from
    the distinct flagged words, at C speed: most prompts need only some of the flags."""

    __slots__ = ("_canon", "_words", "_at", "_any", "words", "_places")

    def __init__(self, canon: list[str], words: dict[str, int], present: frozenset[str] | None,
                 places: dict[int, int] | None = None):
        self._canon = canon
        self.words = present  # the distinct words of the text
        self._words = words  # distinct word -> its flags
        self._places = places  # or, for a short prompt, word index -> its flags
        self._at: dict[int, list[int]] = {}
        self._any = 0  # every flag some word has
        for flags in (words if places is None else places).values():
            self._any |= flags

    def with_flag(self, flag: int) -> set[str]:
        return {w for w, f in self._words.items() if f & flag}

    def at(self, flag: int) -> list[int]:
        """Indexes of the words with `flag`, in text order."""
        if not self._any & flag:
            return []
        found = self._at.get(flag)
        if found is None:
            if self._places is not None:
                found = [i for i, f in self._places.items() if f & flag]
            else:
                found = self.at_words(self.with_flag(flag))
            self._at[flag] = found
        return found

    def at_words(self, words: set[str]) -> list[int]:
        """Indexes of these words, in text order."""
        if len(words) == 1:
            return list(compress(count(), map(next(iter(words)).__eq__, self._canon)))
        return list(compress(count(), map(words.__contains__, self._canon))) if words else []


class _LookupCache(dict):
    """Canonical word -> `_TermIndex` lookup result, computed on first sight (bounded: hostile prompts
    bring endless new words)."""

    def __init__(self, compute: Callable[[str], tuple]):
        super().__init__()
        self._compute = compute

    def __missing__(self, word: str) -> tuple:
        if len(self) >= _CACHE_LIMIT:
            self.clear()
        value = self[word] = self._compute(word)
        return value


class _TermIndex:
    """Canonical token -> groups, phrases by first token, prefixes by length, the run automaton,
    the split-word join table and the automaton for scripts written without spaces."""

    def __init__(self, entries: Sequence[tuple[int, str, bool]], flags: dict[str, int],
                 classify: Callable[[str], int] = lambda word: 0):
        single: dict[str, list[int]] = {}
        phrases: dict[str, list[tuple[tuple[str, ...], int]]] = {}
        prefixes: dict[str, list[int]] = {}
        cjk: dict[str, list[int]] = {}
        for group, term, is_prefix in entries:
            words = _phrase_tokens(term)
            joined = "".join(words)
            if any(is_cjk(w) for w in words):
                cjk.setdefault(joined, []).append(group)  # matched as a substring: no word breaks
            if is_prefix:
                prefixes.setdefault(joined, []).append(group)
                continue
            single.setdefault(joined, []).append(group)  # also "taylorswift", "yearold"
            if len(words) > 1:
                phrases.setdefault(words[0], []).append((words[1:], group))
        self.single = {k: tuple(dict.fromkeys(v)) for k, v in single.items()}
        self.squeezed: dict[str, tuple[int, ...]] = {}
        for k, v in self.single.items():
            self.squeezed[squeeze(k)] = tuple(dict.fromkeys(self.squeezed.get(squeeze(k), ()) + v))
        # first word -> second word -> (the words after the first, group): one lookup rejects a phrase
        self.phrases: dict[str, dict[str, tuple[tuple[tuple[str, ...], int], ...]]] = {}
        for first, entries in phrases.items():
            by_second: dict[str, list[tuple[tuple[str, ...], int]]] = {}
            for rest, g in entries:
                by_second.setdefault(rest[0], []).append((rest, g))
            self.phrases[first] = {k: tuple(v) for k, v in by_second.items()}
        self.prefixes = {k: tuple(dict.fromkeys(v)) for k, v in prefixes.items()}
        self.prefix_lengths = sorted({len(k) for k in self.prefixes})
        self.runs = _AhoCorasick({**self.single, **self.prefixes})
        self.cjk = _AhoCorasick({k: tuple(dict.fromkeys(v)) for k, v in cjk.items()}) if cjk else None
        # Every beginning of a one-word term, so joining pieces stops as soon as it cannot succeed.
        self.join_starts = frozenset(k[:i] for k in (*self.single, *self.prefixes) for i in range(2, len(k) + 1))
        self.flags = dict(flags)
        self.classify = classify  # flags that need a computation, done once per distinct word
        for start in self.join_starts:
            self.flags[start] = self.flags.get(start, 0) | JOIN_START
        self._cache = _LookupCache(self._lookup)
        self._cjk_cache: dict[str, list[int]] = {}
        self._run_cache: dict[tuple[str, int], list[tuple[int, int, tuple[int, ...]]]] = {}
        self.longest = max(map(len, (*self.single, *self.prefixes)), default=1)

    def lookup(self, canon: str) -> tuple[tuple[int, ...], dict[str, tuple[tuple[tuple[str, ...], int], ...]], int]:
        """Groups matched by one token on its own, phrases that may start with it, and its flags."""
        return self._cache[canon]

    def _lookup(self, canon: str) -> tuple[tuple[int, ...], dict[str, tuple[tuple[tuple[str, ...], int], ...]], int]:
        groups = list(self.single.get(canon, _EMPTY))
        stem = canon[:-1] if len(canon) > 3 and canon[-1] == "s" else None
        if stem:
            groups += self.single.get(stem, _EMPTY)
        for k in self.prefix_lengths:
            if len(canon) < k:
                break
            groups += self.prefixes.get(canon[:k], _EMPTY)
        if not groups and has_long_repeat(canon):  # stretched words: "teeeen", "nuuude"
            groups += self.lookup(shorten_repeats(canon))[0]
            groups += self.squeezed.get(squeeze(canon), _EMPTY)
        phrases = self.phrases.get(canon, _NO_PHRASES)
        if stem and stem in self.phrases:
            phrases = {k: phrases.get(k, ()) + v for k, v in self.phrases[stem].items()} | {
                k: v for k, v in phrases.items() if k not in self.phrases[stem]}
        flags = self.flags.get(canon, 0) | self.classify(canon)
        return (tuple(dict.fromkeys(groups)), phrases, flags) if groups or phrases or flags else _NOTHING

    def scan(self, tokens: Tokens, ordinary: frozenset[str]) -> tuple[dict[int, list[tuple[int, int]]], Flagged]:
        """Group -> (first word, last word) of its term occurrences, in the order the sources are read
        (words and phrases in text order, then digits glued to words, spaced-out runs, words without
        spaces, split words), and word index -> flags of the words that have any."""
        hits: defaultdict[int, list[tuple[int, int]]] = defaultdict(list)
        canon = tokens.canon
        # one dictionary lookup per word at C speed; Python looks only at the words that matched something
        found = list(map(self._cache.__getitem__, canon))
        cache = self._cache
        if len(canon) <= _SHORT_WORDS:
            # An ordinary prompt: its few matching words are read one by one (what the maps below save
            # on a long prompt, they would cost here).
            special = list(compress(count(), map(is_not, found, repeat(_NOTHING))))
            flagged = Flagged(canon, {}, None, {i: f for i in special if (f := found[i][2])})
            self._read_one_by_one(canon, found, special, hits)
            self._other_sources(tokens, found, flagged, ordinary, hits)
            return hits, flagged
        # Decided once per distinct word: whether it starts a term, and whether a phrase starting
        # with it could go on (its next word occurs in the text at all).
        present = frozenset(canon)
        flag_words: dict[str, int] = {}
        term_words, phrase_words = set(), set()
        distinct = list(present)
        for word in compress(distinct, map(is_not, map(cache.__getitem__, distinct), repeat(_NOTHING))):
            groups, phrases, flags = cache[word]
            if flags:
                flag_words[word] = flags
            if phrases and _may_go_on(phrases, present):
                phrase_words.add(word)
            if groups or word in phrase_words:
                term_words.add(word)
        flagged = Flagged(canon, flag_words, present)
        term_at = list(compress(count(), map(term_words.__contains__, canon)))
        if len(term_at) > _BULK_MIN_WORDS and len(term_words) <= _BULK_MAX_TERMS:
            # Many places of few distinct terms (a hostile prompt repeats them): each term's places are
            # picked at C speed, and a phrase's by the distinct words that follow, then put in text order
            # per group (a stable sort keeps a word's own term before the phrases starting with it, as
            # the word-by-word reading has them).
            touched = set()
            words_at = list(map(canon.__getitem__, term_at))
            for word in term_words:
                at = list(compress(term_at, map(word.__eq__, words_at)))
                groups, phrases, _ = self._cache[word]
                for g in groups:
                    hits[g].extend(zip(at, at, strict=True))
                    touched.add(g)
                if word in phrase_words:
                    # what follows decides: read once per distinct run of next words
                    size = 1 + max(len(rest) for entries in phrases.values() for rest, _ in entries)
                    keys = list(map(tuple, map(getitem, repeat(canon), map(slice, at, map(add, at, repeat(size))))))
                    earliest = dict(zip(reversed(keys), reversed(at), strict=True))
                    for key, i in earliest.items():
                        phrase_hits = [(g, end - i) for g, end in self._phrases_at(canon, i, phrases)]
                        if not phrase_hits:
                            continue
                        places = at if len(earliest) == 1 else list(compress(at, map(key.__eq__, keys)))
                        for g, d in phrase_hits:
                            hits[g].extend(zip(places, map(add, places, repeat(d)), strict=True))
                            touched.add(g)
            for g in touched:
                hits[g].sort(key=itemgetter(0))
        else:
            self._read_one_by_one(canon, found, term_at, hits)
        self._other_sources(tokens, found, flagged, ordinary, hits)
        return hits, flagged

    def _read_one_by_one(self, canon: list[str], found: list, places: Iterable[int],
                         hits: defaultdict[int, list[tuple[int, int]]]) -> None:
        """The terms and phrases starting at each of `places`, in text order."""
        for i in places:
            groups, phrases, _ = found[i]
            for g in groups:
                hits[g].append((i, i))
            if phrases:
                for g, end in self._phrases_at(canon, i, phrases):
                    hits[g].append((i, end))

    def _other_sources(self, tokens: Tokens, found: list, flagged: Flagged, ordinary: frozenset[str],
                       hits: defaultdict[int, list[tuple[int, int]]]) -> None:
        """Hits beyond words and phrases, in this order: digits glued to words, spaced-out runs, words
        without spaces, split words."""
        canon, cache = tokens.canon, self._cache
        if tokens.joined:  # "7een" split into 7 + een: the whole word too (looked up at C speed)
            looked_up = list(map(cache.__getitem__, tokens.joined.values()))
            for i, (groups, _, _) in compress(zip(tokens.joined, looked_up, strict=True), map(itemgetter(0), looked_up)):
                for g in groups:
                    hits[g].append((i, i + 1))
        for run in tokens.runs:
            first = run[0]
            for start, end, groups in self._run_matches("".join(canon[first:run[-1] + 1])):
                for g in groups:
                    hits[g].append((first + start, first + end - 1))
        if self.cjk is not None and tokens.cjk:
            words_at = list(map(canon.__getitem__, tokens.cjk))
            if len(tokens.cjk) > _BULK_MIN_WORDS and len(distinct := set(words_at)) <= _BULK_MAX_TERMS:
                touched = set()
                for word in distinct:
                    at = list(compress(tokens.cjk, map(word.__eq__, words_at)))
                    for g in self._cjk_groups(word):
                        hits[g].extend(zip(at, at, strict=True))
                        touched.add(g)
                for g in touched:  # each place once per group: text order is the whole order
                    hits[g].sort(key=itemgetter(0))
            else:
                for i, word in zip(tokens.cjk, words_at, strict=True):
                    for g in self._cjk_groups(word):
                        hits[g].append((i, i))
        for g, first, last in self._joins(tokens, found, flagged, ordinary):
            hits[g].append((first, last))

    @staticmethod
    def _phrases_at(canon: list[str], i: int, phrases: dict) -> list[tuple[int, int]]:
        """(group, last word) of the phrases starting at word i."""
        n = len(canon)
        if i + 1 >= n:
            return []
        nxt = canon[i + 1]
        candidates = phrases.get(nxt, ())
        if len(nxt) > 3 and nxt[-1] == "s" and nxt[:-1] in phrases:
            candidates += phrases[nxt[:-1]]
        out = []
        for rest, g in candidates:
            end = i + len(rest)
            if end < n and all(_same(canon[i + 1 + k], w) for k, w in enumerate(rest)):
                out.append((g, end))
        return out

    def _run_matches(self, letters: str) -> list[tuple[int, int, tuple[int, ...]]]:
        """(start, end, groups) of the terms (2+ letters) inside the letters of a spaced-out run, in the
        automaton's order. A long run is read in chunks, each with enough letters before it to finish
        any term ending in it, and the answer for a chunk is cached by its letters: a hostile prompt of
        spaced letters repeats the same chunks."""
        out: list[tuple[int, int, tuple[int, ...]]] = []
        overlap = self.longest - 1
        for chunk_start in range(0, len(letters), _RUN_CHUNK):
            lead = min(overlap, chunk_start)
            piece = letters[chunk_start - lead:chunk_start + _RUN_CHUNK]
            found = self._run_cache.get((piece, lead))
            if found is None:
                found = [(start - lead, end - lead, groups) for start, end, groups in self.runs.finditer(piece)
                         if end > lead and end - start > 1]
                if len(self._run_cache) >= _CACHE_LIMIT:
                    self._run_cache.clear()
                self._run_cache[(piece, lead)] = found
            out.extend((chunk_start + a, chunk_start + b, groups) for a, b, groups in found)
        return out

    def _cjk_groups(self, word: str) -> list[int]:
        """Groups whose terms occur inside a word written without spaces (cached per word)."""
        groups = self._cjk_cache.get(word)
        if groups is None:
            groups = [g for _, _, gs in self.cjk.finditer(word) for g in gs]
            if len(self._cjk_cache) >= _CACHE_LIMIT:
                self._cjk_cache.clear()
            self._cjk_cache[word] = groups
        return groups

    def _joins(self, tokens: Tokens, found: list, flagged: Flagged,
               ordinary: frozenset[str]) -> list[tuple[int, int, int]]:
        """Words split into multi-letter pieces ("nu de", "ch-ild", "lo_li"): the joined form counts when
        it is a term and not every piece is an ordinary word ("an al fresco" stays apart)."""
        canon, starts, out = tokens.canon, self.join_starts, []
        n = len(canon)
        # Done by maps at C speed, a batch of places at a time (a hostile prompt brings thousands of
        # pieces; evidence enough usually comes within the first batch). The answer at a place
        # depends only on the text of the pieces that may join: worked out once per distinct text.
        present = flagged.words
        if n > _BULK_MIN_WORDS * 4 and len(present) <= _FEW_DISTINCT:
            # a prompt of few distinct words (a hostile one repeats them): only first pieces that some
            # word of it could continue are worth visiting
            places = flagged.at_words({w for w in flagged.with_flag(JOIN_START)
                                       if any(w + x in starts for x in present)})
        else:
            places = flagged.at(JOIN_START)
        if places and places[-1] == n - 1:
            places = places[:-1]
        if len(places) <= _JOIN_FEW:  # an ordinary prompt: a plain loop costs less than the maps below
            for i in places:
                if len(out) >= _HITS_PER_GROUP:
                    break
                if not found[i][0] and canon[i] + canon[i + 1] in starts:
                    out.extend((g, i, i + d) for g, d in self._join_at(tokens, i, min(n, i + _JOIN_MAX_PIECES) - 1,
                                                                      ordinary))
            return out
        parts, joins = tokens._parts, {}
        for batch_start in range(0, len(places), _JOIN_BATCH):
            # first pieces that begin a term (never one letter), not a term on their own ...
            batch = places[batch_start:batch_start + _JOIN_BATCH]
            batch = list(compress(batch, map(not_, map(itemgetter(0), map(found.__getitem__, batch)))))
            # ... whose second piece fits
            seconds = map(canon.__getitem__, map(add, batch, repeat(1)))
            batch = list(compress(batch, map(starts.__contains__, map(add, map(canon.__getitem__, batch), seconds))))
            if not batch:
                continue
            lasts = map(min, repeat(n - 1), map(add, batch, repeat(_JOIN_MAX_PIECES - 1)))
            begins = map(add, map(mul, batch, repeat(2)), repeat(1))
            ends = map(add, map(mul, lasts, repeat(2)), repeat(2))
            keys = list(map(tuple, map(getitem, repeat(parts), map(slice, begins, ends))))  # = tokens.piece
            for key, i in dict(zip(reversed(keys), reversed(batch), strict=True)).items():
                if key not in joins:
                    joins[key] = self._join_at(tokens, i, min(n, i + _JOIN_MAX_PIECES) - 1, ordinary)
            for i, key in compress(zip(batch, keys, strict=True), map(bool, map(joins.__getitem__, keys))):
                if len(out) >= _HITS_PER_GROUP:
                    return out
                out.extend((g, i, i + d) for g, d in joins[key])
        return out

    def _join_at(self, tokens: Tokens, i: int, last: int, ordinary: frozenset[str]) -> list[tuple[int, int]]:
        """(group, pieces after the first) of the terms that pieces i..last written together begin with."""
        canon, starts, out = tokens.canon, self.join_starts, []
        joined = canon[i]
        for j in range(i + 1, last + 1):
            gap = tokens.gap(j - 1)
            if not gap or len(gap) > 2 or not _JOIN_GAPS.issuperset(gap):
                break
            joined += canon[j]
            if joined not in starts:
                break
            pieces = canon[i:j + 1]
            # A lone letter is not a word ("se x"), except "a" and "i" (also the leet form of "l").
            if max(map(len, pieces)) < 2 or all(p in ordinary and (len(p) > 1 or p in "ai") for p in pieces):
                continue
            for g in self.lookup(joined)[0]:
                out.append((g, j - i))
        return out


def _may_go_on(phrases: dict, present: frozenset[str]) -> bool:
    """Whether a word of the text is the next word of one of these phrases (or its plural), reading
    whichever of the two is smaller: a common first word such as "in" starts hundreds of phrases."""
    if len(phrases) <= len(present):
        return any(w in present or w + "s" in present for w in phrases)
    return any(w in phrases or (w[-1:] == "s" and w[:-1] in phrases) for w in present)


def _same(token: str, word: str) -> bool:
    return token == word or (len(token) > 3 and token[-1] == "s" and token[:-1] == word)
