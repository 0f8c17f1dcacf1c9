"""The checkpoint's tokenizer, loaded from `tokenizer.json` with the `tokenizers` library (no transformers).

BOS handling follows `tokenizer_config.json` (`add_bos_token`, default true as for Llama/Mixtral
tokenizers): the text is encoded without the tokenizer's own post-processor and BOS is prepended once.

Encoding releases the GIL (`encode_batch` of one text; `encode` holds it for the whole call, which froze the
server's event loop for seconds on a 4 MB prompt), so a thread that tokenizes never stalls the others.
`max_token_bytes` bounds how much text one token can stand for, so a caller can refuse text that can only
overflow the context without tokenizing it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from moe_runtime.errors import CheckpointError, MissingTokenizerError

log = logging.getLogger(__name__)
TOKENIZER_FILE = "tokenizer.json"


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, config: dict):
        self._tok = tokenizer
        self.add_bos = bool(config.get("add_bos_token", True))
        self.add_eos = bool(config.get("add_eos_token", False))
        self.bos_token_id = self._special_id(config.get("bos_token", "<s>"))
        self.eos_token_id = self._special_id(config.get("eos_token", "</s>"))
        self.name = str(config.get("name_or_path", "tokenizer.json"))
        self.max_token_bytes = max_token_bytes(tokenizer)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        path = Path(model_dir) / TOKENIZER_FILE
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for missing or malformed files
            raise CheckpointError(f"{path}: cannot load tokenizer ({e})") from None
        config_path = Path(model_dir) / "tokenizer_config.json"
        config = {}
        if config_path.exists():
            try:
                config = json.loads(config_path.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
        return cls(tok, config)

    def _special_id(self, token: str | dict | None) -> int | None:
        if isinstance(token, dict):  # older configs store AddedToken dicts
            token = token.get("content")
        return None if token is None else self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch, not encode: only the batch call releases the GIL while it runs.
        ids = self._tok.encode_batch([text], add_special_tokens=False)[0].ids
        return self.with_special_tokens(ids) if add_special_tokens else ids

    def with_special_tokens(self, ids: list[int]) -> list[int]:
        """`ids` (from `encode(..., add_special_tokens=False)`) with BOS/EOS as tokenizer_config.json asks."""
        if self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        if self.add_eos and self.eos_token_id is not None:
            ids = [*ids, self.eos_token_id]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    @property
    def backend(self) -> HFTokenizer:
        """The underlying `tokenizers.Tokenizer` (for incremental detokenization)."""
        return self._tok


# `max_token_bytes` holds only while no step of the pipeline can shrink text. These normalizers and
# pre-tokenizers only keep or grow it (byte-level and metaspace mappings turn one input byte into a 1-3 byte
# character), so a vocabulary string is never shorter in UTF-8 than the input it covers. Sequence, Replace
# and Split are checked case by case (`_keeps_text`).
_KEEPING_STEPS = frozenset({"Prepend", "ByteLevel", "Metaspace", "Digits", "Punctuation", "UnicodeScripts"})
UTF8_MAX_CHAR_BYTES = 4


def max_token_bytes(tokenizer: HFTokenizer) -> int | None:
    """The most UTF-8 bytes of input text one token can stand for, or None when the pipeline can shrink
    text without bound, so that no such limit exists. A text of n bytes then needs at least
    n / max_token_bytes tokens.

    None for: normalizers that can shrink text (lowercasing, Unicode normalization, accent or control
    stripping), pre-tokenizers that drop characters (whitespace splitting), models that map a run of
    unknown characters or a whole word to one token (fused unknowns, WordPiece, WordLevel), and added
    tokens that swallow neighbouring whitespace (lstrip/rstrip). Example: the byte-level BPE of the embedded
    models, whose longest vocabulary string is 26 bytes, gives 26.
    """
    spec = json.loads(tokenizer.to_str())
    model = spec["model"]
    if not (_keeps_text(spec.get("normalizer"), "normalizers") and _keeps_text(spec.get("pre_tokenizer"),
                                                                               "pretokenizers")):
        return None
    if any(t.lstrip or t.rstrip for t in tokenizer.get_added_tokens_decoder().values()):
        return None
    if not _bounded_unknowns(model):
        return None
    longest = max(len(token.encode()) for token in tokenizer.get_vocab(with_added_tokens=True))
    # An unknown character (no byte fallback) becomes one <unk> token per character.
    return max(longest, UTF8_MAX_CHAR_BYTES)


def _bounded_unknowns(model: dict) -> bool:
    """Whether the model (its tokenizer.json spec) turns unknown text into at most one token per character:
    byte fallback, or BPE's unknown token without fusing. Unigram fuses unknowns; WordPiece and WordLevel
    map a whole word to one."""
    if model.get("byte_fallback"):
        return model["type"] in ("BPE", "Unigram")
    return model["type"] == "BPE" and not (model.get("unk_token") is not None and model.get("fuse_unk"))


def _keeps_text(step: dict | None, children: str) -> bool:
    """Whether a normalizer or pre-tokenizer (its tokenizer.json spec) never shrinks the text it is given."""
    if step is None:
        return True
    kind = step["type"]
    if kind == "Sequence":
        return all(_keeps_text(child, children) for child in step[children])
    if kind == "Replace":  # a fixed string replaced by one at least as long
        pattern = step["pattern"].get("String")
        return pattern is not None and len(step["content"].encode()) >= len(pattern.encode())
    if kind == "Split":
        return step["behavior"] != "Removed"
    return kind in _KEEPING_STEPS


def load_tokenizer(model_dir: str | Path) -> Tokenizer | None:
    """The checkpoint's tokenizer, or None when it has no tokenizer.json (what `save_pretrained` of a model
    alone writes): then token ids go in and come out, and text is refused (`require_tokenizer`). A
    tokenizer.json that exists but does not load is a `CheckpointError`."""
    if not (Path(model_dir) / TOKENIZER_FILE).exists():
        log.warning("%s has no %s: serving token ids only (text prompts and stop strings are refused, "
                    "output text is empty)", model_dir, TOKENIZER_FILE)
        return None
    return Tokenizer.from_dir(model_dir)


def require_tokenizer(tokenizer: Tokenizer | None, model_dir: str | Path, field: str) -> Tokenizer:
    """`tokenizer`, or a `MissingTokenizerError` naming `field` (what asked for text) and the missing file."""
    if tokenizer is None:
        raise MissingTokenizerError(
            f"{field}: text needs {Path(model_dir) / TOKENIZER_FILE}, which this checkpoint lacks; "
            "send token ids instead (prompt_token_ids, stop_token_ids) or add the tokenizer to the checkpoint"
        )
    return tokenizer
