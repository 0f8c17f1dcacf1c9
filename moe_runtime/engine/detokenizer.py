"""Incremental detokenization with stop strings.

`tokenizers.decoders.DecodeStream` turns token ids into text one token at a time and returns nothing
until a whole UTF-8 character is complete, so a delta never ends inside a multi-byte character. Stop
strings may span several tokens: the last `max(len(stop)) - 1` characters are held back until it is
clear they do not begin a stop string, so text handed out is never taken back.
"""

from __future__ import annotations

from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream


class IncrementalDetokenizer:
    def __init__(self, tokenizer: HFTokenizer, stop: tuple[str, ...] = ()):
        self._tok = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1  # chars that might begin a stop string
        self.text = ""  # all text so far, cut before the stop string once one matched
        self._emitted = 0  # len of text already handed out

    def append(self, token_id: int) -> bool:
        """Decode one more token. Returns True when a stop string now appears (text is cut before it)."""
        piece = self._stream.step(self._tok, token_id)
        if not piece:
            return False
        search_from = max(0, len(self.text) - self._hold)  # a new match must overlap the new piece
        self.text += piece
        hits = [i for i in (self.text.find(s, search_from) for s in self._stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return True
        return False

    @property
    def emitted_text(self) -> str:
        """The text handed out so far."""
        return self.text[: self._emitted]

    def take_delta(self, finished: bool) -> str:
        """Text not handed out yet; while unfinished, minus the tail that might begin a stop string."""
        end = len(self.text) if finished else max(self._emitted, len(self.text) - self._hold)
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta
