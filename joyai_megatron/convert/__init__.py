"""Megatron <-> Hugging Face (DeepseekV3 layout) conversion for JoyAI-LLM Flash.

Per-tensor API (RL weight sync, QAT export): :func:`megatron_to_hf`, :func:`hf_to_megatron`,
:func:`hf_names_for`, :func:`mapping_table`.  Whole checkpoints: :func:`export_to_hf`,
:func:`import_from_hf`, :func:`verify`.  CLI: ``python -m joyai_megatron.convert``.
"""

from joyai_megatron.convert.common import ConversionError
from joyai_megatron.convert.mapping import (
    MappingTable,
    TensorMap,
    canonical_name,
    hf_names_for,
    hf_to_megatron,
    mapping_table,
    megatron_to_hf,
)

__all__ = [
    "ConversionError",
    "MappingTable",
    "TensorMap",
    "canonical_name",
    "export_to_hf",
    "hf_names_for",
    "hf_to_megatron",
    "import_from_hf",
    "mapping_table",
    "megatron_to_hf",
    "verify",
]


def __getattr__(name: str):  # the converters import Megatron/transformers lazily
    if name == "export_to_hf":
        from joyai_megatron.convert.to_hf import export_to_hf

        return export_to_hf
    if name == "import_from_hf":
        from joyai_megatron.convert.from_hf import import_from_hf

        return import_from_hf
    if name == "verify":
        from joyai_megatron.convert.verify import verify

        return verify
    raise AttributeError(name)
