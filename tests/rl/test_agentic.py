"""Agentic RL pieces without a trainer: tools, environment limits, the multi-turn episode runner
and its loss mask (token by token against the chat template's rendering), per-turn advantages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from joyai_megatron.rl.agentic import EpisodeLimits, ToolEnvironment, calculate, get_tool, parse_tool_calls
from joyai_megatron.rl.agentic.episodes import Episode, EpisodeInfo, run_episodes
from joyai_megatron.rl.agentic.tools import CalculatorError
from joyai_megatron.rl.prompts import Prompt
from joyai_megatron.rl.rollout.base import RolloutEngine, Sample, SamplingParams


def _call(name: str, **arguments) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


# --- tools ------------------------------------------------------------------------------------------
def test_calculator_is_exact_on_big_integers_and_refuses_everything_else():
    a, b = 12345678901234567890123, 98765432109876543210987
    assert calculate(f"{a} * {b}") == a * b
    assert calculate("(2 ** 200 - 1) // 3 % 1000007") == (2**200 - 1) // 3 % 1000007
    assert calculate("-(7 - 10) * 3") == 9
    for bad, why in [
        ("__import__('os').system('id')", "unsupported syntax: Call"),
        ("x + 1", "unsupported syntax: Name"),
        ("1.5 * 2", "unsupported syntax: Constant"),
        ("9 ** 9 ** 9", "exceeds"),  # refused before it is computed
        ("1 // 0", "division by zero"),
        ("2 ** -1", "negative exponents"),
        ("(1", "syntax error"),
    ]:
        with pytest.raises(CalculatorError, match=why):
            calculate(bad)
    tool = get_tool("calculator")
    assert tool.run({"expression": "6 * 7"}, 1.0).content == "42"
    assert tool.run({"expression": "os.getcwd()"}, 1.0).error
    assert tool.run({"expr": "1"}, 1.0).error


def test_parse_tool_calls_marks_malformed_calls():
    text = _call("calculator", expression="1 + 2") + "\n<tool_call>\n{not json}\n</tool_call>\n<tool_call>\n{"
    calls = parse_tool_calls(text)
    assert (
        calls[0].name == "calculator"
        and calls[0].arguments == {"expression": "1 + 2"}
        and calls[0].error is None
    )
    assert "not JSON" in calls[1].error
    assert calls[2].error == "unterminated <tool_call>"
    as_string = '<tool_call>\n{"name": "python", "arguments": "{\\"code\\": \\"print(1)\\"}"}\n</tool_call>'
    assert parse_tool_calls(as_string)[0].arguments == {"code": "print(1)"}
    assert parse_tool_calls("Answer: 3") == []


# --- environment ------------------------------------------------------------------------------------
def _prompt(answer: str = "42", tools=("calculator",)) -> Prompt:
    return Prompt("p", [1, 2, 3], answer, "math", "arithmetic", False, tools)


def _env(limits: EpisodeLimits, clock=None) -> ToolEnvironment:
    from joyai_megatron.rl.rewards import get_reward

    kwargs = {"clock": clock} if clock else {}
    env = ToolEnvironment({"calculator": get_tool("calculator")}, get_reward("math"), limits, **kwargs)
    env.reset(_prompt())
    return env


def test_environment_answers_tools_and_limits():
    env = _env(EpisodeLimits(max_turns=3))
    step = env.step(_call("calculator", expression="6 * 7"), stopped=True)
    assert not step.done and step.messages == [{"role": "tool", "content": "42"}] and step.tool_errors == 0
    step = env.step(_call("nope") + _call("calculator", expression="6 *"), stopped=True)
    assert step.tool_calls == 2 and step.tool_errors == 2
    assert [m["content"].startswith("error:") for m in step.messages] == [True, True]
    step = env.step("Answer: 42", stopped=True)
    assert step.done and env.truncated is None and env.reward() == 1.0
    # A tool call at the last allowed turn: truncated, scored truncated_reward, tool not run.
    env = _env(EpisodeLimits(max_turns=1, truncated_reward=0.0))
    step = env.step(_call("calculator", expression="6 * 7"), stopped=True)
    assert step.done and step.messages == [] and env.truncated == "max_turns" and env.reward() == 0.0
    # A turn cut at max_new_tokens (no stop token) is no answer, even if it has the right number.
    env = _env(EpisodeLimits())
    assert env.step("Answer: 42", stopped=False).done and env.truncated == "length" and env.reward() == 0.0
    # The total wall clock: a fake clock jumps past it between turns.
    now = [0.0]
    env = _env(EpisodeLimits(total_timeout_s=5.0), clock=lambda: now[0])
    now[0] = 6.0
    assert env.step(_call("calculator", expression="1 + 1"), stopped=True).done and env.truncated == "timeout"


def test_python_tool_runs_in_the_sandbox_and_contains_hostile_calls(tmp_path):
    from joyai_megatron.rl.rewards.sandbox import bubblewrap_available

    if not bubblewrap_available():
        pytest.skip("bubblewrap is unusable here")
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    tool = get_tool("python")
    assert tool.run({"code": "print(2 ** 100)"}, 10.0) == type(tool.run({"code": "print(1)"}, 10.0))(
        str(2**100), False
    )
    hostile = {
        "read outside": f"print(open({str(secret)!r}).read())",
        "write outside": f"open({str(tmp_path / 'pwned')!r}, 'w').write('x')",
        "network": "import socket; socket.create_connection(('1.1.1.1', 53), timeout=2)",
        "fork bomb": "import os\nwhile True:\n    os.fork()",
        "busy loop": "while True: pass",
    }
    for name, code in hostile.items():
        result = tool.run({"code": code}, 3.0)
        assert result.error, (name, result)
        assert "s3cret" not in result.content
    assert not (tmp_path / "pwned").exists()


# --- episodes: the loss mask against the rendered conversation ---------------------------------------
class ScriptedEngine(RolloutEngine):
    """Answers turn k of every episode with ``script[k]``, canonically tokenized (as a policy
    trained on the template would), with made-up log-probs."""

    def __init__(self, encode, script: list[str], stop: int) -> None:
        self.encode, self.script, self.stop, self.calls = encode, script, stop, 0

    def update_weights(self, named_tensors):
        return 0

    def _sample(self, request):
        text = self.script[self.calls]
        self.calls += 1
        ids = self.encode(text) + [self.stop]
        return [
            [Sample(ids, [-0.5] * len(ids), stopped=True)] for _ in request.prompts for _ in range(request.n)
        ]


@pytest.fixture(scope="module")
def agentic_data(tmp_path_factory) -> Path:
    from data_prep.agentic_demo import build_agentic_demo

    root = tmp_path_factory.mktemp("agentic")
    build_agentic_demo(root, sft_examples=8, rl_prompts=4, eval_prompts=2, seq_length=256)
    return root


@pytest.mark.parametrize("thinking", [False, True])
def test_episode_mask_matches_the_rendered_conversation_token_by_token(agentic_data, thinking):
    from transformers import AutoTokenizer

    from data_prep.chat import Conversation, encode_rendered, render
    from data_prep.tokenizer import make_encoder
    from joyai_megatron.rl.rewards import get_reward
    from joyai_megatron.training.tokenizer import HFTokenizer

    tok_dir = agentic_data / "tokenizer"
    tokenizer = HFTokenizer(tok_dir)
    tools = [get_tool("calculator").schema()]
    messages = [
        {"role": "system", "content": "Use the calculator."},
        {"role": "user", "content": "What is 537 * 86?"},
    ]
    prompt_text, _ = render(Conversation(messages, tools, thinking), add_generation_prompt=True)
    prompt_ids = tokenizer.encode(prompt_text)
    think = "<think>\nmultiply\n</think>\n\n" if thinking else ""
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "537 * 86"}}\n</tool_call>'
    script = [think + call, think + "Answer: 46182"]
    im_end = tokenizer.token_to_id("<|im_end|>")
    engine = ScriptedEngine(tokenizer.encode, script, im_end)
    env = ToolEnvironment({"calculator": get_tool("calculator")}, get_reward("math"), EpisodeLimits())
    env.reset(_prompt("46182"))
    params = SamplingParams(64, stop_token_ids=(im_end,))
    (episode,) = run_episodes(
        engine, [Episode(prompt_ids, env, thinking)], params, 0, 3, 512, tokenizer.encode,
        lambda ids: tokenizer.decode(ids[:-1] if ids and ids[-1] == im_end else ids),
    )  # fmt: skip
    assert episode.done and episode.info.truncated is None and env.reward() == 1.0
    assert (episode.info.turns, episode.info.tool_calls, episode.info.tool_errors) == (2, 1, 0)

    # The same conversation as SFT data renders it (HF-compatible template, assistant spans).
    fn_call = {
        "type": "function",
        "function": {"name": "calculator", "arguments": {"expression": "537 * 86"}},
    }
    reasoning = {"reasoning_content": "multiply"} if thinking else {}
    full = messages + [
        {"role": "assistant", "content": "", "tool_calls": [fn_call], **reasoning},
        {"role": "tool", "content": "46182"},
        {"role": "assistant", "content": "Answer: 46182", **reasoning},
    ]
    text, spans = render(Conversation(full, tools, thinking))
    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    assert text == hf.apply_chat_template(full, tools=tools, tokenize=False, enable_thinking=thinking)
    ((ids, mask),) = encode_rendered(make_encoder(str(tok_dir)), [(text, spans)])
    got_ids = episode.prompt_ids + episode.response_ids
    got_mask = [0] * len(episode.prompt_ids) + episode.response_mask
    # The rendering ends with the template's newline after the final <|im_end|>: not generated.
    assert ids.tolist()[: len(got_ids)] == got_ids and len(ids) == len(got_ids) + 1
    assert mask.tolist()[: len(got_mask)] == got_mask
    assert sum(got_mask) == sum(len(engine.encode(s)) + 1 for s in script)  # policy tokens only
    tool_tokens = [t for t, m in zip(episode.response_ids, episode.response_mask, strict=True) if not m]
    assert "46182" in tokenizer.decode(tool_tokens) and all(
        lp == 0.0 for lp, m in zip(episode.logprobs, episode.response_mask, strict=True) if not m
    )
    # Micro-batch rows carry the mask: loss_mask[j] = 1 where token j + 1 is the policy's.
    from joyai_megatron.rl.batch import Trajectory, micro_batches

    traj = Trajectory(
        episode.prompt_ids, episode.response_ids, episode.logprobs, 1.0, 0, 0, 0.5,
        response_mask=episode.response_mask, episode=episode.info,
    )  # fmt: skip
    (batch,) = micro_batches([traj], 1, 1, 512, tokenizer.pad, 0)
    row_mask = batch["loss_mask"][0]
    for j in range(len(got_ids) - 1):
        assert int(row_mask[j]) == got_mask[j + 1], j
    assert batch["rollout_logprobs"][0][row_mask.bool()].eq(-0.5).all()


def test_context_truncation_and_turn_limit(agentic_data):
    from joyai_megatron.rl.rewards import get_reward
    from joyai_megatron.training.tokenizer import HFTokenizer

    tokenizer = HFTokenizer(agentic_data / "tokenizer")
    im_end = tokenizer.token_to_id("<|im_end|>")
    call = _call("calculator", expression="2 * 3")
    params = SamplingParams(64, stop_token_ids=(im_end,))
    decode = tokenizer.decode

    def play(seq_length: int, max_turns: int) -> Episode:
        env = ToolEnvironment(
            {"calculator": get_tool("calculator")}, get_reward("math"), EpisodeLimits(max_turns)
        )
        env.reset(_prompt("6"))
        engine = ScriptedEngine(tokenizer.encode, [call] * 4, im_end)
        (ep,) = run_episodes(
            engine, [Episode([5, 6, 7], env, False)], params, 0, 4, seq_length, tokenizer.encode, decode
        )
        assert env.reward() == 0.0
        return ep

    ep = play(512, 2)  # calls the tool at every turn: truncated at the turn limit
    assert ep.info.truncated == "max_turns" and ep.info.turns == 2 and ep.info.tool_calls == 2
    ep = play(20, 4)  # the first turn does not fit: cut at the sequence length, never longer
    assert ep.info.truncated == "context" and len(ep.prompt_ids) + len(ep.response_ids) == 20


def test_per_turn_advantages_charge_errors_to_their_turn():
    from joyai_megatron.rl.agentic.advantages import per_turn_advantages, turn_returns

    info = EpisodeInfo(turns=3, turn_errors=[1, 0, 0], turn_ids=[0, 0, 1, 1, 2])
    assert turn_returns(1.0, info, 0.1) == [0.9, 1.0, 1.0]
    clean = EpisodeInfo(turns=2, turn_errors=[0, 0], turn_ids=[0, 1])
    returns, tokens = per_turn_advantages([1.0, 1.0], [info, clean], 2, 0.1, scale_by_std=False)
    assert returns.tolist() == pytest.approx([0.9, 1.0])
    # Baseline 0.95: the erroring turn -0.05, the erroring episode's later turns +0.05.
    assert tokens[0] == pytest.approx([-0.05, -0.05, 0.05, 0.05, 0.05])
    assert tokens[1] == pytest.approx([0.05, 0.05])
    # Zero penalty: every token has its trajectory's advantage (the trajectory level).
    _, tokens = per_turn_advantages([1.0, 0.0], [info, clean], 2, 0.0, scale_by_std=False)
    assert tokens == [[0.5] * 5, [-0.5] * 2]
    # Per-token advantages reach the micro-batch as [rows, seq_length], aligned with loss_mask.
    from joyai_megatron.rl.batch import Trajectory, micro_batches

    traj = Trajectory([1, 2], [3, 4, 5], [0.0] * 3, 1.0, 0, 0, token_advantages=[0.1, 0.2, 0.3])
    (batch,) = micro_batches([traj], 1, 1, 8, 0, 0)
    assert batch["advantages"].shape == (1, 8)
    assert batch["advantages"][0][batch["loss_mask"][0].bool()].tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert torch.count_nonzero(batch["advantages"][0]) == 3


def test_hostile_python_calls_inside_an_episode_are_tool_errors(agentic_data, tmp_path):
    """The episode runner (what the trainer runs each rollout) with the python tool: file access
    outside the sandbox, network and a fork bomb come back as tool errors, the episode goes on to
    its answer and is scored; nothing escapes and nothing raises."""
    from joyai_megatron.rl.agentic.env import tool_environment
    from joyai_megatron.rl.rewards import get_reward
    from joyai_megatron.rl.rewards.sandbox import bubblewrap_available
    from joyai_megatron.training.tokenizer import HFTokenizer

    if not bubblewrap_available():
        pytest.skip("bubblewrap is unusable here")
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    tokenizer = HFTokenizer(agentic_data / "tokenizer")
    im_end = tokenizer.token_to_id("<|im_end|>")
    script = [
        _call("python", code=f"print(open({str(secret)!r}).read())")
        + _call("python", code=f"open({str(tmp_path / 'pwned')!r}, 'w').write('x')"),
        _call("python", code="import urllib.request; print(urllib.request.urlopen('http://1.1.1.1').read())"),
        _call("python", code="import os\nwhile True:\n    os.fork()"),
        "Answer: 6",
    ]
    env = tool_environment(
        ["python", "calculator"], get_reward("math"), EpisodeLimits(max_turns=5, turn_timeout_s=5)
    )
    env.reset(_prompt("6", tools=("python", "calculator")))
    engine = ScriptedEngine(tokenizer.encode, script, im_end)
    params = SamplingParams(128, stop_token_ids=(im_end,))
    (ep,) = run_episodes(
        engine,
        [Episode([5, 6, 7], env, False)],
        params,
        0,
        5,
        2048,
        tokenizer.encode,
        lambda ids: tokenizer.decode(ids[:-1]),
    )
    assert (ep.info.turns, ep.info.tool_calls, ep.info.tool_errors) == (4, 4, 4)
    assert ep.info.turn_errors == [2, 1, 1, 0] and ep.info.truncated is None
    assert env.reward() == 1.0  # the final answer still counts
    replies = tokenizer.decode([t for t, m in zip(ep.response_ids, ep.response_mask, strict=True) if not m])
    assert replies.count("error:") == 4 and "s3cret" not in replies
    assert not (tmp_path / "pwned").exists()
