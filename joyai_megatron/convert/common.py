"""Small pieces every conversion direction shares: errors, dtypes, atomic output directories."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from joyai_megatron.errors import UserError, disk_full_error, is_disk_full


class ConversionError(UserError, RuntimeError):
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


OUTPUT_MARKER = ".joyai-convert.json"  # written into every output; --overwrite replaces only these


def check_paths_apart(output: Path, inputs: list[str | os.PathLike]) -> None:
    """Refuse an output that is, contains or lies inside an input: replacing it would delete the input."""
    for given in inputs:
        source = Path(given).resolve()
        if output == source:
            relation = "is"
        elif output in source.parents:
            relation = "contains"
        elif source in output.parents:
            relation = "lies inside"
        else:
            continue
        raise ConversionError(
            "output overlaps the input",
            f"--output {output}",
            f"it {relation} the input {source}",
            "write the output to a directory of its own, outside the input",
        )


def _check_replaceable(output: Path, overwrite: bool) -> None:
    if not output.exists():
        return
    if not overwrite:
        raise ConversionError(f"output {output} already exists (pass --overwrite to replace it)")
    if not output.is_dir() or (any(output.iterdir()) and not (output / OUTPUT_MARKER).is_file()):
        raise ConversionError(
            "refusing to overwrite",
            str(output),
            f"--overwrite replaces only directories this tool wrote (with {OUTPUT_MARKER}); this one has none",
            "remove it yourself if it really is disposable, or choose another --output",
        )


@contextlib.contextmanager
def atomic_output_dir(
    output: str | os.PathLike, overwrite: bool = False, inputs: list[str | os.PathLike] | None = None
) -> Iterator[Path]:
    """Yield a fresh ``<output>.tmp-*`` sibling; rename it to ``output`` only on success.

    An interrupted or failed conversion (exception, Ctrl-C, SIGTERM) removes the temporary
    directory, so a half-written export never looks like a finished one.  A kill -9 can leave the
    ``.tmp-*`` directory behind but never ``output`` itself.  ``output`` may not overlap ``inputs``,
    and ``overwrite`` replaces only an earlier output of this tool (its marker present).
    """
    output = Path(output).resolve()
    check_paths_apart(output, inputs or [])
    _check_replaceable(output, overwrite)
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
        marker = {"written_by": "joyai_megatron", "inputs": [str(i) for i in inputs or []]}
        (tmp / OUTPUT_MARKER).write_text(json.dumps(marker) + "\n")
        if output.exists():
            old = output.with_name(f"{output.name}.old-{os.getpid()}")
            output.rename(old)
            tmp.rename(output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(output)
    except Exception as err:
        if is_disk_full(err, tmp):
            raise disk_full_error(output, err) from err
        raise
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
