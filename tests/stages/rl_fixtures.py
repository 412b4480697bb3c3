"""Data and recipes for the RL stage tests: a trained demo tokenizer and a few word problems.

Run as a script (``torchrun ... rl_fixtures.py rl RECIPE [overrides]``) it is the CLI with the
test rewards registered, so multi-rank runs can score with ``rl_test_parity`` too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.joyai_helpers import REPO, RL_TINY

PROBLEMS = [
    ("Mia has 3 apples and finds 4 more. How many apples does Mia have now?", "7"),
    ("Leo has 9 coins and gives away 2. How many coins are left?", "7"),
    ("How many letters are in the word lemon?", "5"),
    ("Ava buys 2 bags with 3 shells in each. How many shells is that in total?", "6"),
]


def build_rl_data(root: Path) -> tuple[Path, Path]:
    """(tokenizer dir, prompts JSONL) under ``root``, from the demo corpus (a few seconds)."""
    import json

    from data_prep.demo import make_corpus
    from data_prep.rl import prepare_rl
    from data_prep.train_tokenizer import train_tokenizer

    corpus = root / "corpus"
    make_corpus(corpus)
    tokenizer = root / "tokenizer"
    train_tokenizer([str(corpus / "**" / "*.jsonl")], tokenizer)
    raw = root / "raw.jsonl"
    raw.write_text(
        "".join(
            json.dumps({"prompt": q + " Give the final answer as 'Answer: N'.", "answer": a, "verifier": "math",
                        "domain": "math" if i != 2 else "counting"}) + "\n"
            for i, (q, a) in enumerate(PROBLEMS)
        )
    )  # fmt: skip
    prompts = root / "rl.jsonl"
    prepare_rl([str(raw)], str(tokenizer), str(prompts))
    return tokenizer, prompts


def write_rl_recipe(directory: Path, rl_data: tuple[Path, Path], **sections: dict) -> Path:
    """The tiny RL recipe shrunk for tests: 2 prompts x 4 samples per rollout, 2 steps per rollout;
    ``rl_data`` is the ``rl_data`` fixture's (tokenizer, prompts)."""
    tokenizer, prompts = rl_data
    recipe = {
        "base": str(RL_TINY),
        "train": {"seq_length": 48, "micro_batch_size": 2, "global_batch_size": 4, "train_iters": 4},
        "data": {"tokenizer": str(tokenizer), "rl_path": str(prompts), "cache_dir": str(directory / "cache")},
        "rl": {
            "group_size": 4,
            "prompts_per_step": 2,
            "steps_per_rollout": 2,
            "max_new_tokens": 8,
            "reward": "rl_test_parity",
            "eval_path": str(prompts),
            "eval_interval": 2,
            "eval_prompts": 4,
        },
        "checkpoint": {"dir": str(directory / "ckpt"), "load": None, "save_interval": 0, "keep_last": 3},
        "logging": {"dir": str(directory / "logs"), "interval": 1, "tensorboard": False},
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    path = directory / "recipe.yaml"
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    return path


def parity_reward(response: str, reference: str) -> float:
    """A reward with variance under any policy: whether the response has an even length."""
    del reference
    return float(len(response) % 2 == 0)


def code_parity_reward(response: str, reference: str) -> float:
    """The ``code`` verifier end to end (extraction, sandbox, judge) on a program that returns the
    response's length parity: a code reward with variance under any policy, even an untrained one."""
    from joyai_megatron.rl.rewards import get_reward

    del reference
    program = f"```python\ndef parity():\n    return {len(response) % 2}\n```"
    return get_reward("code")(program, "assert parity() == 0\n")


_SANDBOXED_ANSWER_TESTS = (
    "import re\nm = re.findall(r'Answer:\\s*(-?\\d+(?:\\.\\d+)?)', answer())\n"
    "assert m and float(m[-1]) == float({reference!r})\n"
)


def sandboxed_math_format_reward(response: str, reference: str) -> float:
    """``math_format`` with its correctness verdict from the code verifier's sandbox: the response
    becomes ``def answer(): return <response>``, the judge's tests compare its last "Answer: N"
    with the reference; the 0.2 format credit stays a regex (docs/rl.md section 10)."""
    import re

    from joyai_megatron.rl.rewards.sandbox import run_python_tests

    program = f"def answer():\n    return {response!r}\n"
    if run_python_tests(program, _SANDBOXED_ANSWER_TESTS.format(reference=reference), isolated=True).passed:
        return 1.0
    return 0.2 if re.search(r"(?:^|\n)\s*Answer:\s*-?\d+(?:\.\d+)?\s*$", response) else 0.0


def register_test_rewards() -> None:
    """The test rewards: ``rl_test_parity``, ``rl_test_code_parity``, ``rl_test_sandboxed_math_format``
    (once per process)."""
    from joyai_megatron.rl.rewards import available_rewards, register_reward

    if "rl_test_parity" not in available_rewards():
        register_reward("rl_test_parity")(parity_reward)
        register_reward("rl_test_code_parity")(code_parity_reward)
        register_reward("rl_test_sandboxed_math_format")(sandboxed_math_format_reward)


def rl_test_data(root: Path) -> tuple[Path, Path]:
    """``build_rl_data`` with the test rewards registered."""
    register_test_rewards()
    return build_rl_data(root)


def train_rl(recipe_path: Path, overrides: list[str] | None = None) -> tuple[Any, dict, dict]:
    """Build the RL trainer in this process, snapshot its initial weights, train;
    returns (trainer, result, initial weights)."""
    from joyai_megatron.config.recipe import load_recipe
    from joyai_megatron.rl.reference import snapshot
    from joyai_megatron.stages.rl import RLStage
    from joyai_megatron.training.trainer import Trainer

    recipe = load_recipe(str(recipe_path), overrides or [])
    trainer = Trainer(recipe, RLStage)
    before = snapshot(trainer.model)
    return trainer, trainer.train(), before


def run_rl_ranks(recipe: Path, overrides: list[str], nproc: int, timeout: int = 900):
    """The rl stage on ``nproc`` gloo ranks through torchrun, with the test rewards registered."""
    import subprocess
    import sys

    from tests.joyai_helpers import clean_env, free_port

    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-port", str(free_port()), "-m", "tests.stages.rl_fixtures", "rl", str(recipe), *overrides,
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-6000:] + result.stderr[-6000:])
    return result


if __name__ == "__main__":
    import sys

    from joyai_megatron.cli import main

    register_test_rewards()
    sys.exit(main(sys.argv[1:]))
