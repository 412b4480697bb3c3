"""Runs the reference tests against the solution through the channel; never runs model code.

The tests see the program's top-level names: plain values as themselves, functions, classes and
other objects as ``Remote`` proxies whose calls, attributes, items, ``len`` and iteration are
requests to the solution's process, answered with plain values or more proxies. A proxy is
opaque: it compares equal only to itself and has no behaviour the solution defines, so an object
whose ``__eq__`` always returns True is no use. The verdict goes to the parent on a pipe only this
process holds, after the last test line ran.
"""

from __future__ import annotations

import builtins
import json
import sys
from typing import IO, Any

from limits import apply_limits
from wire import WireError, decode, encode, receive, send


class SolutionError(Exception):
    """An exception raised in the solution's process that is not a built-in exception type."""


class Channel:
    def __init__(self, requests: IO[bytes], replies: IO[bytes]) -> None:
        self.requests, self.replies = requests, replies

    def _ref_of(self, value: Any) -> int:
        if type(value) is Remote:
            return object.__getattribute__(value, "_ref")
        raise WireError(f"cannot send a {type(value).__name__} to the solution")

    def decode(self, data: Any) -> Any:
        return decode(data, lambda ref: Remote(self, ref))

    def request(self, op: str, ref: int, args: tuple | list, kwargs: dict | None = None) -> Any:
        message = {"op": op, "ref": ref, "args": encode(list(args), self._ref_of)}
        if kwargs is not None:
            message["kwargs"] = encode(kwargs, self._ref_of)
        send(self.requests, message)
        reply = receive(self.replies)
        if "error" in reply:
            raise _exception(reply["error"])
        if op == "call":
            _copy_back(args, reply.get("args"), self)
        return self.decode(reply.get("value"))


def _exception(error: Any) -> Exception:
    """The solution's exception as a built-in type (so ``except ValueError`` in a test works)."""
    name, message = (str(part) for part in error) if type(error) is list and len(error) == 2 else ("?", "")
    kind = getattr(builtins, name, None)
    if isinstance(kind, type) and issubclass(kind, Exception):
        return kind(message)
    return SolutionError(f"{name}: {message}")


def _copy_back(args: tuple | list, after: Any, channel: Channel) -> None:
    """Apply the solution's in-place changes to the test's own list / dict / set arguments."""
    if type(after) is not list or len(after) != len(args):
        return
    for original, changed in zip(args, after, strict=True):
        if changed is None:
            continue
        value = channel.decode(changed)
        if type(original) is type(value) and type(value) in (list, bytearray):
            original[:] = value
        elif type(original) is type(value) and type(value) in (dict, set):
            original.clear()
            original.update(value)


class Remote:
    """An object living in the solution's process; every use is a request over the channel."""

    __slots__ = ("_channel", "_ref")

    def __init__(self, channel: Channel, ref: int) -> None:
        object.__setattr__(self, "_channel", channel)
        object.__setattr__(self, "_ref", ref)

    def _ask(self, op: str, *args: Any) -> Any:
        return self._channel.request(op, self._ref, args)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._channel.request("call", self._ref, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return self._ask("getattr", name)

    def __getitem__(self, key: Any) -> Any:
        return self._ask("getitem", key)

    def __len__(self) -> int:
        return self._ask("len")

    def __iter__(self) -> Any:
        return iter(self._ask("list"))

    def __bool__(self) -> bool:  # truthiness must not fall back to a remote __len__
        return True

    def __repr__(self) -> str:
        return f"<solution object #{self._ref}>"


def _run(tests: str, channel: Channel) -> None:
    ready = receive(channel.replies)
    if "error" in ready:
        raise _exception(ready["error"])
    exports = channel.decode(ready.get("exports"))
    if type(exports) is not dict or not all(type(k) is str for k in exports):
        raise WireError("malformed exports")
    namespace = {**exports, "__name__": "__main__", "__builtins__": builtins}
    exec(compile(tests, "tests.py", "exec"), namespace)


def main() -> None:
    config = json.loads(sys.argv[1])
    with open(config["source"], encoding="utf-8") as handle:
        tests = handle.read()
    replies_fd, requests_fd, verdict_fd = config["fds"]
    verdict_pipe = open(verdict_fd, "w", encoding="utf-8")  # noqa: SIM115 - written once, at the end
    apply_limits(config)
    channel = Channel(open(requests_fd, "wb"), open(replies_fd, "rb"))  # noqa: SIM115
    try:
        _run(tests, channel)
        verdict = {"passed": True}
    except BaseException as exc:  # any failure of the tests is a verdict
        import traceback  # only on failure: it costs a few ms at every start

        traceback.print_exc()
        verdict = {"passed": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    verdict_pipe.write(json.dumps(verdict))
    verdict_pipe.close()


if __name__ == "__main__":
    main()
