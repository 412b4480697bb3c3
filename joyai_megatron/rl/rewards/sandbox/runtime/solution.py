"""The only process that runs model-written code.

``script`` mode runs the program as ``__main__`` on the stdin the parent gave it; the parent judges
its stdout. ``functions`` mode executes the program, then serves the judge's requests (call,
attribute, item, len, list) over the channel, answering with plain values or handles. Nothing
secret lives here: the tests, the verdict and the judge's memory are in other processes, so
whatever the program does to this process (frames, gc, monkeypatching this file, writing to the
channel itself) can only change the answers it sends.
"""

from __future__ import annotations

import json
import sys
import traceback
from types import ModuleType
from typing import Any

from limits import apply_limits
from wire import WireError, decode, encode, encode_names, receive, send

_MUTABLE = (list, dict, set, bytearray)
_EXPORT_VALUE_BYTES = 64 * 1024


def _error(exc: BaseException) -> list[str]:
    try:
        return [type(exc).__name__, str(exc)[:2000]]
    except BaseException:  # a custom __str__ may raise
        return [type(exc).__name__, ""]


class Server:
    """Holds the program's objects by handle number and answers the judge's requests."""

    def __init__(self, namespace: dict) -> None:
        self.objects: list[Any] = []
        self.namespace = namespace

    def handle_for(self, value: Any) -> int:
        self.objects.append(value)
        return len(self.objects) - 1

    def resolve(self, ref: Any) -> Any:
        if type(ref) is not int or not 0 <= ref < len(self.objects):
            raise WireError(f"unknown handle {ref!r}")
        return self.objects[ref]

    def exports(self) -> Any:
        """The program's top-level names (not modules, not dunders) as values or handles."""
        names = {
            k: v
            for k, v in self.namespace.items()
            if not k.startswith("__") and not isinstance(v, ModuleType)
        }
        return encode_names(names, self.handle_for, _EXPORT_VALUE_BYTES)

    def answer(self, request: dict) -> dict:
        op, target = request.get("op"), self.resolve(request.get("ref"))
        args = decode(request.get("args", []), self.resolve)
        if op == "call":
            kwargs = decode(request.get("kwargs", {"d": []}), self.resolve)
            result = target(*args, **kwargs)
            # In-place changes to list / dict / set arguments travel back (``sort_in_place(xs)``).
            after = [encode(a, self.handle_for) if type(a) in _MUTABLE else None for a in args]
            return {"value": encode(result, self.handle_for), "args": after}
        if op == "getattr":
            result = getattr(target, str(args[0]))
        elif op == "getitem":
            result = target[args[0]]
        elif op == "len":
            result = len(target)
        elif op == "list":
            result = list(target)
        else:
            raise WireError(f"unknown op {op!r}")
        return {"value": encode(result, self.handle_for)}

    def serve(self, requests: Any, replies: Any) -> None:
        while True:
            try:
                request = receive(requests)
            except WireError:
                return  # the judge is done
            try:
                reply = self.answer(request)
            except BaseException as exc:  # the program's exceptions are answers too
                reply = {"error": _error(exc)}
            send(replies, reply)


def main() -> None:
    config = json.loads(sys.argv[1])
    with open(config["source"], encoding="utf-8") as handle:
        source = handle.read()
    if config["mode"] == "script":
        apply_limits(config)
        sys.argv = ["solution.py"]
        exec(compile(source, "solution.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        return
    requests_fd, replies_fd = config["fds"]
    with open(requests_fd, "rb") as requests, open(replies_fd, "wb") as replies:
        apply_limits(config)
        namespace = {"__name__": "solution", "__builtins__": __builtins__}
        server = Server(namespace)
        try:
            exec(compile(source, "solution.py", "exec"), namespace)
            ready = {"exports": server.exports()}
        except BaseException as exc:  # reported to the judge, which fails the run
            traceback.print_exc()
            ready = {"error": _error(exc)}
        send(replies, ready)
        if "exports" in ready:
            server.serve(requests, replies)


if __name__ == "__main__":
    main()
