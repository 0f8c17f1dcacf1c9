"""A byte-level BPE tokenizer trained locally from a seeded synthetic corpus (no download, no hub).

The corpus is generated, not read from the machine, so the same seed gives the same tokenizer on every
host and Python version. Its words are built from syllables with a Zipf-like frequency, plus common English
words, digits, punctuation and non-ASCII text, so BPE learns merges up to the requested vocabulary size.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 as in Mixtral's tokenizer
_ONSETS = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
           "br", "ch", "cr", "dr", "fl", "gr", "kl", "pr", "sh", "st", "th", "tr", "qu"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "ou", "oo", "ie", "y"]
_CODAS = ["", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "rk", "x"]
_ENGLISH = ("the of and to in is that for it as was with be by on not he this are or his from at which but "
            "have an they you were her she there been one all we their has would when if so no will more "
            "model expert token layer router cache memory server request stream batch").split()
_EXTRA = ["café", "naïve", "Straße", "über", "日本語", "中文", "한국어", "emoji 🙂", "Ωμέγα", "привет", "¿qué?"]
_PUNCT = [".", ",", "!", "?", ";", ":", "\n", " -", " (", ")", '"']


def synthetic_corpus(seed: int, num_words: int, lexicon_size: int) -> Iterator[str]:
    """Yield lines of seeded pseudo-text: `num_words` words drawn Zipf-like from `lexicon_size` inventions."""
    rng = random.Random(seed)
    lexicon = [
        "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(rng.randint(1, 4)))
        for _ in range(lexicon_size)
    ]
    words = _ENGLISH + _EXTRA + lexicon
    weights = [1.0 / (rank + 1) ** 0.9 for rank in range(len(words))]
    line: list[str] = []
    for word in rng.choices(words, weights=weights, k=num_words):
        if rng.random() < 0.05:
            word = word.capitalize()
        if rng.random() < 0.03:
            word = str(rng.randint(0, 9999))
        line.append(word)
        if rng.random() < 0.08:
            line.append(rng.choice(_PUNCT))
        if len(line) >= 40:
            yield " ".join(line)
            line = []
    if line:
        yield " ".join(line)


def train_tokenizer(vocab_size: int, seed: int) -> Tokenizer:
    """Train a byte-level BPE with exactly `vocab_size` entries (reserved tokens pad any shortfall)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    num_words = min(60 * vocab_size, 1_500_000)
    tok.train_from_iterator(synthetic_corpus(seed, num_words, lexicon_size=max(vocab_size // 2, 256)), trainer)
    shortfall = vocab_size - tok.get_vocab_size(with_added_tokens=True)
    if shortfall > 0:
        tok.add_special_tokens([f"<reserved_{i}>" for i in range(shortfall)])
    bos = SPECIAL_TOKENS[1]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return tok
