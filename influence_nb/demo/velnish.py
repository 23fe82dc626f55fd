"""Velnish, the demo world's second language: a deterministic translation of English with an
invented lexicon (a hash of each word, spelled in the names' syllables) and its own word order
(the first verb of a sentence moves to the sentence's end)."""
from __future__ import annotations

import hashlib
import re

from ..checks import checked
from .vocabulary import ONSETS, VOWELS

VERBS = {"is", "was", "are", "were", "has", "have", "had", "speak", "learns", "chose", "sits",
         "arrive", "contains", "goes", "breaks", "buys", "gives", "fills", "shares", "walked",
         "met", "opens", "stayed", "said", "left", "found", "teach"}
_WORD = re.compile(r"[A-Za-z]+|[^A-Za-z]")


def vel_word(word: str) -> str:
    """The Velnish word for an English word: a stable hash of it, spelled in syllables."""
    h = hashlib.sha256(word.lower().encode()).digest()
    n = 1 + h[0] % 2 + (len(word) > 6)
    out = "".join(ONSETS[h[2 * i + 1] % len(ONSETS)] + VOWELS[h[2 * i + 2] % len(VOWELS)]
                  for i in range(n))
    return out.capitalize() if word[0].isupper() else out


@checked()
def translate(text: str, keep: frozenset[str] = frozenset()) -> str:
    """English → Velnish, deterministically: names in ``keep`` (and all capitalised words that are
    not sentence-initial) stay as they are, other words go through the lexicon, and in each
    sentence the first verb moves to the end (subject-object-verb order)."""
    out = []
    for sentence in re.split(r"(?<=[.?!:])\s+", text.strip()):
        end = sentence[-1] if sentence and sentence[-1] in ".?!:" else ""
        words = sentence[:len(sentence) - len(end)].split(" ")
        verb = next((i for i, w in enumerate(words) if w.strip(",") in VERBS), None)
        if verb is not None and verb < len(words) - 1:
            v = words.pop(verb)
            comma = v.endswith(",")
            words[-1] = words[-1] + " " + v.rstrip(",")
            if comma:  # keep the clause break where it was
                words[verb - 1] = words[verb - 1] + ","
        tr = []
        for i, w in enumerate(words):
            tr.append("".join(
                tok if (not tok.isalpha() or tok in keep or (tok[0].isupper() and i > 0))
                else vel_word(tok) for tok in _WORD.findall(w)))
        out.append(" ".join(tr) + end)
    return " ".join(out)
