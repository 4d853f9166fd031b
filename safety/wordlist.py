"""Ordinary English words: the pieces that must not be glued into a rule term, or read as names.

From `wordfreq` (its 'small' English list, built from Wikipedia, subtitles, news, books, web text
and more; shipped with the wheel, nothing is downloaded), the most frequent words in the canonical
leet-folded form that tokens have. A frequency list, not a dictionary: "nu", "lo" and "ch" are not
ordinary words, so "nu de" and "lo li" can be rejoined, while "an al" (both frequent) is left alone.
"""

from __future__ import annotations

from functools import cache

from safety.normalize import canonical

ORDINARY_TOP_N = 5000


@cache
def ordinary_words() -> frozenset[str]:
    from wordfreq import top_n_list

    return frozenset(canonical(w) for w in top_n_list("en", ORDINARY_TOP_N, wordlist="small") if w.isalnum())
