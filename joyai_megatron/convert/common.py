"""Small pieces every conversion direction shares: errors, dtypes, atomic output directories."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch


class ConversionError(RuntimeError):
    """A checkpoint that cannot be converted as asked; the message names the tensor or key."""


DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}

# safetensors header names <-> torch dtypes (the subset model weights use).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}

# config.json's `torch_dtype` strings.
HF_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float32: "float32",
}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None or name == "keep":
        return None
    try:
        return DTYPES[name]
    except KeyError:
        raise ConversionError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)} or 'keep'") from None


def fmt_shape(shape: object) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"  # type: ignore[union-attr]


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@contextlib.contextmanager
def atomic_output_dir(output: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh ``<output>.tmp-*`` sibling; rename it to ``output`` only on success.

    An interrupted or failed conversion (exception, Ctrl-C, SIGTERM) removes the temporary
    directory, so a half-written export never looks like a finished one.  A kill -9 can leave the
    ``.tmp-*`` directory behind but never ``output`` itself.
    """
    output = Path(output).resolve()
    if output.exists() and not overwrite:
        raise ConversionError(f"output {output} already exists (pass --overwrite to replace it)")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{output.name}.tmp-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the export private to its writer

    def _on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = None
    with contextlib.suppress(ValueError):  # only the main thread may install handlers
        previous = signal.signal(signal.SIGTERM, _on_term)
    try:
        yield tmp
        if output.exists():
            old = output.with_name(f"{output.name}.old-{os.getpid()}")
            output.rename(old)
            tmp.rename(output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(output)
    finally:
        _remove_tree(tmp)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _remove_tree(path: Path, attempts: int = 25) -> None:
    """rmtree that outlasts a writer thread finishing its last chunk after an interrupt."""
    for _ in range(attempts):
        if not path.exists():
            return
        shutil.rmtree(path, ignore_errors=True)
        if path.exists():
            time.sleep(0.2)


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def copy_tokenizer_files(src: str | os.PathLike | None, dst: Path) -> list[str]:
    """Copy the tokenizer and chat template files that exist in ``src``; returns their names."""
    if not src:
        return []
    src = Path(src)
    if not src.is_dir():
        return []
    copied = []
    for path in sorted(src.iterdir()):
        if path.is_file() and (path.name in TOKENIZER_FILES or path.suffix == ".tiktoken"):
            shutil.copy2(path, dst / path.name)
            copied.append(path.name)
    return copied
