"""``data_prep make-corpus``: a small, license-clean pretraining corpus from CPython's own docs.

Text comes from ``pydoc_data.topics`` (the language reference topics ``help()`` shows) and from
the docstrings of the pure-Python standard library, read with ``ast`` so no module is imported.
Both ship with CPython under the PSF license; output depends only on the interpreter's version.
"""

from __future__ import annotations

import ast
import json
import pydoc_data.topics
import sysconfig
from collections.abc import Iterator
from pathlib import Path

# Packages whose docstrings are mostly test scaffolding or generated tables.
_SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "site-packages",
    "turtledemo",
    "__pycache__",
    "encodings",
}
DOCSTRING_SHARDS = 4
MAX_CORPUS_BYTES = 4 << 20


def topic_documents() -> Iterator[str]:
    """One document per ``help()`` topic, in sorted topic order."""
    for name in sorted(pydoc_data.topics.topics):
        text = pydoc_data.topics.topics[name].strip()
        if text:
            yield text


def _module_document(path: Path, module: str) -> str | None:
    """A module's docstrings as one document: the module's, then each class's and function's."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None
    parts = []
    if doc := ast.get_docstring(tree):
        parts.append(f"Module {module}\n\n{doc}")
    for node in ast.walk(tree):
        public = (
            isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.name[0] != "_"
        )
        if public and (doc := ast.get_docstring(node)):
            kind = "class" if isinstance(node, ast.ClassDef) else "def"
            parts.append(f"{kind} {module}.{node.name}\n\n{doc}")
    return "\n\n".join(parts) if len(parts) > 1 else None


def docstring_documents() -> Iterator[str]:
    """One document per stdlib module with at least two public docstrings, in path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if _SKIP_DIRS.intersection(relative.parts[:-1]) or relative.name.startswith("test_"):
            continue
        module = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
        if doc := _module_document(path, module):
            yield doc


def _write_jsonl(path: Path, texts: list[str]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for text in texts:
            out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return path.stat().st_size


def write_pretrain_corpus(output: Path) -> list[Path]:
    """``pretrain/topics.jsonl`` and ``pretrain/docstrings-K.jsonl``, capped at ~4 MiB in all."""
    budget = MAX_CORPUS_BYTES
    topics = list(topic_documents())
    written = [output / "pretrain" / "topics.jsonl"]
    budget -= _write_jsonl(written[0], topics)
    docs: list[str] = []
    for doc in docstring_documents():
        budget -= len(doc.encode("utf-8")) + 12
        if budget < 0:
            break
        docs.append(doc)
    for k in range(DOCSTRING_SHARDS):
        path = output / "pretrain" / f"docstrings-{k}.jsonl"
        _write_jsonl(path, docs[k::DOCSTRING_SHARDS])
        written.append(path)
    return written
