"""Data preparation for joyai-megatron: ``python -m data_prep <subcommand>``.

APIs the training stages import (each module stays light: no torch):

* ``data_prep.blend.load_blend(path) -> (prefixes, weights)``: a blend YAML for Megatron-Core
* ``data_prep.sft.PackedSFTDataset(path, pad_to=None)``: packed SFT rows with ``cu_seqlens``
* ``data_prep.dpo.PreferenceDataset(path, seq_length=None)``: padded chosen/rejected pairs
* ``data_prep.rl.read_rl_prompts(path) -> list[RLPrompt]``: rendered RL prompts with answers

See docs/data_prep.md for the commands and the stored formats.
"""
