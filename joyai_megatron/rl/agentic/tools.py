"""Tools an agentic episode can call: a safe big-integer calculator and a sandboxed Python executor.

The policy calls a tool in the chat template's format (data_prep/chat_template.jinja, the same
rendering as HF ``apply_chat_template(..., tools=...)``)::

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "48213 * 9127"}}
    </tool_call>

Every tool returns a :class:`ToolResult` and never raises for anything the model wrote: a malformed
call, an unknown tool, a bad expression, a crash, a timeout or a sandbox violation is a tool error
(counted, shown to the model as the tool's reply). Tools are registered by name (``register_tool``)
so recipes list them (``rl.agentic.tools``) and environments look them up.
"""

from __future__ import annotations

import ast
import json
import operator
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]
    error: str | None = None  # a malformed call: what was wrong with it


@dataclass(frozen=True)
class ToolResult:
    content: str
    error: bool


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every ``<tool_call>`` block of an assistant turn, in order; malformed ones carry ``error``."""
    calls = []
    for body in TOOL_CALL.findall(text):
        try:
            payload = json.loads(body)
        except json.JSONDecodeError as err:
            calls.append(ToolCall("", {}, f"tool call is not JSON: {err.msg}"))
            continue
        if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
            calls.append(ToolCall("", {}, "tool call needs a string 'name'"))
            continue
        args = payload.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                args = None
        if not isinstance(args, dict):
            calls.append(ToolCall(payload["name"], {}, "tool call 'arguments' must be an object"))
            continue
        calls.append(ToolCall(payload["name"], args))
    # An opening tag without its closing tag is a call the model did not finish: also an error.
    if text.count("<tool_call>") > len(calls):
        calls.append(ToolCall("", {}, "unterminated <tool_call>"))
    return calls


class Tool(ABC):
    name = "tool"
    description = ""
    parameters: dict[str, Any] = {}

    def schema(self) -> dict[str, Any]:
        """The OpenAI / HF ``tools=`` entry the chat template lists in the system turn."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    @abstractmethod
    def run(self, arguments: dict[str, Any], timeout_s: float) -> ToolResult:
        """Execute one call; must not raise for anything in ``arguments``."""


_TOOLS: dict[str, type[Tool]] = {}


def string_arguments(*names: str) -> dict[str, Any]:
    """The JSON schema of a tool whose arguments are the given required strings."""
    return {
        "type": "object",
        "properties": {name: {"type": "string"} for name in names},
        "required": list(names),
    }


def register_tool(cls: type[Tool]) -> type[Tool]:
    if cls.name in _TOOLS:
        raise ValueError(f"tool {cls.name!r} is already registered")
    _TOOLS[cls.name] = cls
    return cls


def get_tool(name: str) -> Tool:
    try:
        return _TOOLS[name]()
    except KeyError:
        raise KeyError(f"unknown tool {name!r}; registered: {sorted(_TOOLS)}") from None


def available_tools() -> list[str]:
    return sorted(_TOOLS)


# --- calculator -----------------------------------------------------------------------------------
_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_BITS = 1 << 16  # operands and results up to ~19,700 decimal digits
MAX_EXPRESSION = 1000


class CalculatorError(ValueError):
    pass


def _check_size(value: int) -> int:
    if value.bit_length() > MAX_BITS:
        raise CalculatorError(f"result exceeds {MAX_BITS} bits")
    return value


def _eval(node: ast.AST) -> int:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return _check_size(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        op = type(node.op)
        if op in (ast.FloorDiv, ast.Mod) and right == 0:
            raise CalculatorError("division by zero")
        if op is ast.Pow:  # bound the result's size before computing it
            if right < 0:
                raise CalculatorError("negative exponents are not supported (integers only)")
            if abs(left) > 1 and right * max(abs(left).bit_length() - 1, 1) > MAX_BITS:
                raise CalculatorError(f"result exceeds {MAX_BITS} bits")
        if op is ast.Mult and left.bit_length() + right.bit_length() > MAX_BITS + 1:
            raise CalculatorError(f"result exceeds {MAX_BITS} bits")
        return _check_size(_BINARY[op](left, right))
    raise CalculatorError(f"unsupported syntax: {type(node).__name__}")


def calculate(expression: str) -> int:
    """Exact integer arithmetic (+ - * // % ** and parentheses) by walking the AST: no names, calls,
    attributes or floats, operands and results bounded to MAX_BITS (so ``9**9**9`` is refused
    before it is computed)."""
    if len(expression) > MAX_EXPRESSION:
        raise CalculatorError(f"expression longer than {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as err:
        raise CalculatorError(f"syntax error: {err.msg}") from None
    return _eval(tree)


@register_tool
class Calculator(Tool):
    name = "calculator"
    description = "Exact integer arithmetic: + - * // % ** and parentheses."
    parameters = string_arguments("expression")

    def run(self, arguments: dict[str, Any], timeout_s: float) -> ToolResult:
        del timeout_s  # bounded by MAX_BITS: microseconds
        expression = arguments.get("expression")
        if not isinstance(expression, str):
            return ToolResult("error: 'expression' must be a string", True)
        try:
            return ToolResult(str(calculate(expression)), False)
        except (CalculatorError, RecursionError, MemoryError) as err:
            return ToolResult(f"error: {err}", True)


# --- python ---------------------------------------------------------------------------------------
MAX_OUTPUT_CHARS = 1000


@register_tool
class PythonExecutor(Tool):
    """Runs the model's code in the code verifier's bubblewrap sandbox (rewards/sandbox/): no network,
    no view of the host's files, process / memory / CPU / file-size limits, a wall clock."""

    name = "python"
    description = "Run a Python program; returns its standard output."
    parameters = string_arguments("code")
    memory_mb = 256

    def run(self, arguments: dict[str, Any], timeout_s: float) -> ToolResult:
        from joyai_megatron.rl.rewards.sandbox import SandboxUnavailableError, run_python_program

        code = arguments.get("code")
        if not isinstance(code, str):
            return ToolResult("error: 'code' must be a string", True)
        try:
            run = run_python_program(code, "", timeout_s=timeout_s, memory_mb=self.memory_mb)
        except SandboxUnavailableError:
            raise  # a setup problem, not the model's: the trainer's config check reports it first
        except OSError as err:
            return ToolResult(f"error: {err}", True)
        if run.timed_out:
            return ToolResult(f"error: timed out after {timeout_s:g} s", True)
        if run.returncode != 0:
            tail = run.stderr.strip().splitlines()[-1:] or [f"exit status {run.returncode}"]
            return ToolResult(f"error: {tail[0][:MAX_OUTPUT_CHARS]}", True)
        return ToolResult(run.stdout[:MAX_OUTPUT_CHARS].rstrip("\n"), False)
