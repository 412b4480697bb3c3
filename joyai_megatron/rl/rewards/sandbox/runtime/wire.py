"""The narrow channel between the judge and the solution: plain values as JSON lines over pipes.

Whatever the solution's process sends, the judge only ever turns it into plain data (None, bool,
int, float, str, bytes, complex and lists / tuples / dicts / sets of them) or an opaque handle
number: a decoder that never calls constructors, ``__eq__`` or any other code of the sender, so
there is no object through which the solution's code could run on the judging side (no pickle,
no "always equal" objects). Standard library only: this file runs inside the sandbox.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import IO, Any

MAX_LINE_BYTES = 8 * 1024 * 1024
MAX_DEPTH = 64
_SCALARS = (type(None), bool, int, float, str)


class WireError(Exception):
    """A malformed, oversized or missing message: the sender broke the protocol."""


# Containers of items and their tags (a list goes as a JSON array, untagged).
_ITEM_TAGS: dict[type, str] = {list: "", tuple: "t", set: "s", frozenset: "f"}


def _deeper(depth: int) -> int:
    """The depth of a container's items; refuses values nested deeper than MAX_DEPTH."""
    if depth >= MAX_DEPTH:
        raise WireError("value nested too deeply")
    return depth + 1


def encode(value: Any, handle_for: Callable[[Any], int] | None = None, depth: int = 0) -> Any:
    """JSON-ready form of ``value``; objects that are not plain data become ``{"h": handle_for(obj)}``.

    Only exact built-in types count as plain data (an ``int`` subclass with its own ``__eq__`` is a
    handle), so what a value means never depends on code the other side wrote.
    """
    kind = type(value)
    if kind in _SCALARS:
        return value
    nested = _deeper(depth)
    if kind is dict:
        return {
            "d": [[encode(k, handle_for, nested), encode(v, handle_for, nested)] for k, v in value.items()]
        }
    tag = _ITEM_TAGS.get(kind)
    if tag is not None:
        items = [encode(v, handle_for, nested) for v in value]
        return {tag: items} if tag else items
    if kind is bytes or kind is bytearray:
        return {"b" if kind is bytes else "y": base64.b64encode(value).decode("ascii")}
    if kind is complex:
        return {"c": [value.real, value.imag]}
    if handle_for is None:
        raise WireError(f"cannot send a {kind.__name__} over the channel")
    return {"h": handle_for(value)}


def encode_names(values: dict[str, Any], handle_for: Callable[[Any], int], max_bytes: int) -> Any:
    """``encode(values)``, except that a value whose encoding is deeper than MAX_DEPTH or longer
    than ``max_bytes`` goes as a handle (a large precomputed table stays usable through calls)."""
    items = []
    for name, value in values.items():
        try:
            data = encode(value, handle_for)
            if len(json.dumps(data)) > max_bytes:
                data = {"h": handle_for(value)}
        except WireError:
            data = {"h": handle_for(value)}
        items.append([name, data])
    return {"d": items}


def decode(data: Any, resolve: Callable[[int], Any], depth: int = 0) -> Any:
    """The value ``encode`` produced; ``resolve(n)`` turns handle n into the receiver's object."""
    kind = type(data)
    if kind in _SCALARS:
        return data
    nested = _deeper(depth)
    if kind is list:
        return [decode(v, resolve, nested) for v in data]
    if kind is not dict or len(data) != 1:
        raise WireError(f"malformed value: {kind.__name__}")
    (tag, body), = data.items()  # fmt: skip
    try:
        if tag == "h" and type(body) is int:
            return resolve(body)
        if tag == "c":
            real, imag = body
            return complex(float(real), float(imag))
        if tag in ("b", "y"):
            raw = base64.b64decode(body.encode("ascii"), validate=True)
            return raw if tag == "b" else bytearray(raw)
        items = [decode(v, resolve, nested) for v in _as_list(body)]
        if tag == "t":
            return tuple(items)
        if tag == "s":
            return set(items)
        if tag == "f":
            return frozenset(items)
        if tag == "d":
            return {k: v for k, v in (_as_pair(item) for item in items)}
    except WireError:
        raise
    except (TypeError, ValueError, AttributeError) as error:  # unhashable keys, bad base64, ...
        raise WireError(f"malformed {tag!r} value: {error}") from None
    raise WireError(f"unknown tag {tag!r}")


def _as_list(body: Any) -> list:
    if type(body) is not list:
        raise WireError("malformed container")
    return body


def _as_pair(item: Any) -> tuple[Any, Any]:
    if type(item) is not list or len(item) != 2:
        raise WireError("malformed dict item")
    return item[0], item[1]


def send(stream: IO[bytes], message: dict) -> None:
    """Write one message as one line (NaN / infinity allowed: they are floats a solution may return)."""
    line = json.dumps(message, separators=(",", ":")).encode("utf-8") + b"\n"
    if len(line) > MAX_LINE_BYTES:
        raise WireError(f"message of {len(line)} bytes exceeds {MAX_LINE_BYTES}")
    stream.write(line)
    stream.flush()


def receive(stream: IO[bytes]) -> dict:
    """Read one message; raises WireError on end of stream, an oversized line or bad JSON."""
    line = stream.readline(MAX_LINE_BYTES + 1)
    if not line.endswith(b"\n"):
        raise WireError("channel closed" if len(line) <= MAX_LINE_BYTES else "message too large")
    try:
        message = json.loads(line)
    except (ValueError, RecursionError) as error:
        raise WireError(f"bad message: {error}") from None
    if type(message) is not dict:
        raise WireError("a message must be a JSON object")
    return message
