"""Loading a Hugging Face ``tokenizer.json`` and encoding text fast but identically.

Two engines produce the same ids: ``hf`` (the reference, ``tokenizers.Tokenizer.encode_batch``)
and ``gigatoken`` (PyPI ``gigatoken``, a Rust BPE engine ~50x faster on the byte-level BPE
families it recognises). ``auto`` picks gigatoken when it can load the tokenizer and falls back to
``hf`` otherwise; every shard re-checks a sample of its documents against ``hf``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from tokenizers import Tokenizer

from data_prep.errors import DataPrepError
from joyai_megatron.training.tokenizer import load_tokenizer_file

Engine = Literal["auto", "gigatoken", "hf"]
DEFAULT_EOD = "<|end_of_text|>"


def resolve_tokenizer_json(path: str | Path) -> Path:
    """``path`` itself, or ``path/tokenizer.json`` for a tokenizer directory."""
    resolved = Path(path)
    if resolved.is_dir():
        resolved = resolved / "tokenizer.json"
    if not resolved.is_file():
        raise DataPrepError(f"--tokenizer {path}: no tokenizer.json there")
    return resolved


@dataclass(frozen=True)
class TokenizerInfo:
    """What outputs depend on: the file's hash, the id space, and the end-of-document id."""

    path: str
    sha256: str
    vocab_size: int
    eod_id: int
    eod_token: str
    pad_id: int


def token_id(tokenizer: Tokenizer, token: str, path: str | Path) -> int:
    ident = tokenizer.token_to_id(token)
    if ident is None:
        raise DataPrepError(f"{path}: token {token!r} is not in the vocabulary")
    return ident


def _config_token(path: Path, key: str) -> str | None:
    """A named special token from the ``tokenizer_config.json`` beside ``tokenizer.json``."""
    config = path.parent / "tokenizer_config.json"
    if not config.is_file():
        return None
    value = json.loads(config.read_text()).get(key)
    return value.get("content") if isinstance(value, dict) else value


def tokenizer_info(path: str | Path, eod_token: str | None = None) -> TokenizerInfo:
    """Describe a tokenizer; EOD defaults to the config's ``eos_token``, else ``<|end_of_text|>``."""
    json_path = resolve_tokenizer_json(path)
    tokenizer = load_tokenizer_file(json_path)
    eod = eod_token or _config_token(json_path, "eos_token") or DEFAULT_EOD
    pad = _config_token(json_path, "pad_token")
    eod_id = token_id(tokenizer, eod, json_path)
    return TokenizerInfo(
        path=str(json_path),
        sha256=hashlib.sha256(json_path.read_bytes()).hexdigest(),
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
        eod_id=eod_id,
        eod_token=eod,
        pad_id=token_id(tokenizer, pad, json_path) if pad else eod_id,
    )


class Encoder(Protocol):
    name: str

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All ids concatenated (uint32) and the per-text counts (int64)."""
        ...


class HFEncoder:
    """The reference: ``tokenizers`` batch encoding without post-processor specials."""

    name = "hf"

    def __init__(self, path: str | Path) -> None:
        self.tokenizer = load_tokenizer_file(resolve_tokenizer_json(path))

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(texts))
        flat = np.fromiter((i for e in encodings for i in e.ids), dtype=np.uint32, count=int(lengths.sum()))
        return flat, lengths


class GigatokenEncoder:
    """gigatoken's Rust BPE; ``parallel=False`` keeps it on one thread inside worker processes."""

    name = "gigatoken"

    def __init__(self, path: str | Path, parallel: bool) -> None:
        import gigatoken  # optional dependency: only this engine needs it

        self.backend = gigatoken.Tokenizer(str(resolve_tokenizer_json(path))).backend
        self.parallel = parallel

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        import awkward as ak

        encoded = self.backend.encode_batch(texts, parallel=self.parallel)
        return ak.to_numpy(ak.flatten(encoded, axis=1)), ak.to_numpy(ak.num(encoded, axis=1)).astype(np.int64)


def make_encoder(path: str | Path, engine: Engine = "auto", parallel: bool = True) -> Encoder:
    """The requested engine; ``auto`` falls back to ``hf`` when gigatoken is absent or refuses."""
    if engine == "hf":
        return HFEncoder(path)
    try:
        return GigatokenEncoder(path, parallel)
    except (ImportError, ValueError, RuntimeError) as exc:
        if engine == "gigatoken":
            raise DataPrepError(f"--engine gigatoken cannot load {path}: {exc}") from exc
        return HFEncoder(path)


def encode_each(encoder: Encoder, texts: list[str]) -> list[np.ndarray]:
    """One id array per text."""
    flat, lengths = encoder.encode_flat(texts)
    return np.split(flat, np.cumsum(lengths)[:-1]) if texts else []
