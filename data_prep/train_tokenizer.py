"""``data_prep train-tokenizer``: the small byte-level BPE tokenizer the demo and tests use.

Same pre-tokenizer as DeepSeek-V3 (digits in groups of up to three, CJK runs, then its split
regex, then byte-level), so it exercises the code path of JoyAI's 129,280-id tokenizer and is one
that gigatoken recognises. Special ids are fixed: ``<|begin_of_text|>`` 0, ``<|end_of_text|>`` 1
(EOD/EOS), ``<|pad|>`` 2, then the chat markers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from data_prep.chat import TEMPLATE_PATH
from data_prep.errors import ErrorPolicy
from data_prep.pretrain import expand_inputs
from data_prep.readers import iter_records

SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|im_start|>", "<|im_end|>")
# Added but not "special": they must survive decode(skip_special_tokens=True) for reward parsing.
MARKUP_TOKENS = ("<think>", "</think>", "<tool_call>", "</tool_call>")
DEEPSEEK_V3_SPLIT = (
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+|"
    " ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"
)
DEFAULT_VOCAB_SIZE = 8192


def _texts(paths: list[str]) -> Iterator[str]:
    """Every string in the inputs: ``text`` fields and the contents of chat messages."""
    policy = ErrorPolicy("skip")
    for path in paths:
        for _, record in iter_records(path, policy):
            if isinstance(record.get("text"), str):
                yield record["text"]
            for message in record.get("messages") or []:
                for key in ("content", "reasoning_content"):
                    if isinstance(message, dict) and isinstance(message.get(key), str):
                        yield message[key]
            for key in ("prompt", "chosen", "rejected"):
                if isinstance(record.get(key), str):
                    yield record[key]


def train_tokenizer(inputs: list[str], output: str | Path, vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    """Train on the inputs and write ``tokenizer.json`` + ``tokenizer_config.json`` (with template)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex("\\p{N}{1,3}"), "isolated"),
            pre_tokenizers.Split(Regex("[一-龥\u3040-ゟ゠-ヿ]+"), "isolated"),
            pre_tokenizers.Split(Regex(DEEPSEEK_V3_SPLIT), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIAL_TOKENS, *MARKUP_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_texts(expand_inputs(inputs)), trainer)
    data = json.loads(tokenizer.to_str())
    for token in data["added_tokens"]:
        token["special"] = token["content"] not in MARKUP_TOKENS
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[0],
        "eos_token": SPECIAL_TOKENS[1],
        "pad_token": SPECIAL_TOKENS[2],
        "add_bos_token": False,
        "model_max_length": 131072,
        "chat_template": TEMPLATE_PATH.read_text(),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return out / "tokenizer.json"
