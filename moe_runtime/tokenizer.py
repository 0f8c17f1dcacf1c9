"""The checkpoint's tokenizer, loaded from `tokenizer.json` with the `tokenizers` library (no transformers).

BOS handling follows `tokenizer_config.json` (`add_bos_token`, default true as for Llama/Mixtral
tokenizers): the text is encoded without the tokenizer's own post-processor and BOS is prepended once.
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
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        if add_special_tokens and self.add_eos and self.eos_token_id is not None:
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
