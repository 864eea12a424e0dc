"""Word-level CLIP vocabularies, written offline: a tokenizer that knows a list of words whole.

The embedded shapes model and the tiny test pipelines use them. A prompt word outside such a
vocabulary is spelt out letter by letter, which such a model has never seen; :func:`unknown_words`
finds those words so that the front doors can warn about them.
"""

from __future__ import annotations

import json
import os
import re
import string

__all__ = ["DEFAULT_WORDS", "write_clip_vocab", "unknown_words"]

DEFAULT_WORDS = (
    "a an the of on in at with and small large big tiny red green blue yellow white black gray "
    "orange purple pink brown circle square triangle fox cat dog house tree car watercolor photo "
    "painting left right top bottom center background bright dark"
).split()


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's byte-pair merging: join every occurrence of the best-ranked adjacent pair, repeat."""
    while len(pieces) > 1:
        best = min(zip(pieces, pieces[1:]), key=lambda pair: ranks.get(pair, len(ranks)))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(pieces):
            if tuple(pieces[i:i + 2]) == best:
                merged.append(pieces[i] + pieces[i + 1])
                i += 2
            else:
                merged.append(pieces[i])
                i += 1
        pieces = merged
    return pieces


def write_clip_vocab(folder: str, words=DEFAULT_WORDS) -> str:
    """Write vocab.json + merges.txt for a CLIPTokenizer that knows `words` whole and spells the rest.

    Every lower-case letter and digit is a token (alone and as a word end), so any lower-case
    prompt tokenizes. Each listed word gets the merges that join what the earlier merges leave of
    it, left to right; merges added later rank lower, so they never split an earlier word.
    """
    os.makedirs(folder, exist_ok=True)
    specials = ["<|startoftext|>", "<|endoftext|>"]
    chars = list(string.ascii_lowercase + string.digits + ",.'-!?")
    vocab: dict[str, int] = {}
    ranks: dict[tuple[str, str], int] = {}

    def add(token):
        vocab.setdefault(token, len(vocab))

    for token in specials + chars + [c + "</w>" for c in chars]:
        add(token)
    for word in words:
        pieces = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        left = pieces[0]
        for right in pieces[1:]:
            ranks.setdefault((left, right), len(ranks))
            left = left + right
            add(left)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(pair) for pair in ranks) + "\n")
    return folder


def unknown_words(tokenizer, prompt: str) -> list[str]:
    """The words of `prompt` a word-level tokenizer does not hold whole (empty for any other tokenizer:
    subword vocabularies spell rare words on purpose)."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    # a word-level vocabulary: small, and every entry but the single characters is a whole word
    if not vocab or len(vocab) > 4096:
        return []
    words = re.findall(r"[a-z0-9']+", prompt.lower())
    return sorted({w for w in words if w + "</w>" not in vocab})
