"""The tokenizer the trainer and datasets use: any Hugging Face ``tokenizer.json``.

JoyAI's own tokenizer (or the bundled demo tokenizer from ``data_prep train-tokenizer``) is read
with the ``tokenizers`` library; nothing is downloaded.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer

from joyai_megatron.errors import UserError

EOD_CANDIDATES = ("<|end_of_text|>", "<｜end▁of▁sentence｜>", "</s>", "<|endoftext|>", "<eos>")
PAD_CANDIDATES = ("<|pad|>", "<pad>", "<|padding|>")


def load_tokenizer_file(file: str | Path) -> Tokenizer:
    """``Tokenizer.from_file``, whose parse errors name neither the file nor the fix."""
    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a bare Exception for malformed JSON
        raise UserError(
            "unreadable tokenizer", str(file), f"{err}", "restore the file (a truncated copy or a wrong format?)"
        ) from err


class HFTokenizer:
    """Duck-types what Megatron-Core's datasets read (``eod``, ``pad``, ``vocab_size``)."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(
                f"tokenizer not found: {file} (build the demo one with `python -m data_prep train-tokenizer`)"
            )
        self.path = file.parent
        self._tok = load_tokenizer_file(file)
        # Megatron's dataset cache keys include the tokenizer's identity.
        self.unique_identifiers = {"class": type(self).__name__, "tokenizer_path": [str(file)]}

    def _first_present(self, names: tuple[str, ...]) -> int | None:
        for name in names:
            idx = self._tok.token_to_id(name)
            if idx is not None:
                return idx
        return None

    @cached_property
    def eod(self) -> int:
        idx = self._first_present(EOD_CANDIDATES)
        if idx is None:
            raise ValueError(
                f"{self.path}: tokenizer has none of the end-of-document tokens {EOD_CANDIDATES}"
            )
        return idx

    @cached_property
    def pad(self) -> int:
        idx = self._first_present(PAD_CANDIDATES)
        return self.eod if idx is None else idx

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)
