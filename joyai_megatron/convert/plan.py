"""Where each table row lives in a ``torch_dist`` checkpoint, and the up-front shape check.

Both directions plan every tensor before touching the output: a checkpoint that does not match
its architecture (experts, hidden size, vocab, layers) fails here, naming the first offending
tensor and both shapes, before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass

from joyai_megatron.convert.common import ConversionError, fmt_shape
from joyai_megatron.convert.dist_ckpt import MODEL_KEY_PREFIXES, TensorInfo, ckpt_location
from joyai_megatron.convert.mapping import MappingTable, TensorMap


def mismatch(
    name: str, found: object, found_side: str, expected: object, expected_side: str
) -> ConversionError:
    """The error for the first offending tensor: its name and both sides' shapes."""

    def show(shape: object) -> str:
        return "no such tensor" if shape is None else f"shape {fmt_shape(shape)}"

    return ConversionError(
        f"tensor {name}: {found_side} has {show(found)}, {expected_side} implies {show(expected)}"
    )


@dataclass(frozen=True)
class Region:
    """A rectangle of a stored global tensor."""

    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


def storage_shapes(table: MappingTable, names: str = "both") -> dict[str, tuple[int, ...]]:
    """Stored key -> global shape for every row (experts stacked on a leading axis).

    ``names`` selects the norm spellings: ``local`` (separate norm modules), ``te`` (Transformer
    Engine's fused ``layer_norm_weight``) or ``both``.
    """
    out: dict[str, tuple[int, ...]] = {}
    for row in table.rows:
        for name in row_storage_names(row, names):
            key, expert = ckpt_location(name)
            out[key] = row.megatron_shape if expert is None else (table.arch.num_experts, *row.megatron_shape)
    return out


def row_storage_names(row: TensorMap, names: str = "both") -> tuple[str, ...]:
    """The Megatron names under which ``row`` is (or may be) stored."""
    if not row.aliases or names == "both":
        return (row.megatron, *row.aliases)
    if names == "local":
        return (row.megatron,)
    if names == "te":
        return row.aliases
    raise ConversionError(f"names must be local, te or both, got {names!r}")


def row_regions(row: TensorMap, name: str) -> list[Region]:
    """The stored rectangle of each HF part of ``row`` when stored as Megatron name ``name``."""
    key, expert = ckpt_location(name)
    regions = []
    start = 0
    for shape in row.hf_shapes:
        rest = tuple(0 for _ in shape[1:])
        if expert is None:
            regions.append(Region(key, (start, *rest), shape))
        else:
            regions.append(Region(key, (expert, start, *rest), (1, *shape)))
        start += shape[0]
    return regions


def check_checkpoint(
    table: MappingTable, stored: dict[str, TensorInfo], *, ignore_mtp: bool = False
) -> dict[str, list[str]]:
    """Validate stored model tensors against the table; return row -> the names it is stored under.

    Raises on the first (in model order) missing tensor or shape mismatch, then on any stored
    model tensor the architecture has no place for.
    """
    found: dict[str, list[str]] = {}
    expected = storage_shapes(table)
    for row in table.rows:
        present = []
        for name in row_storage_names(row):
            key, _ = ckpt_location(name)
            if key in stored:
                if stored[key].shape != expected[key]:
                    raise mismatch(key, stored[key].shape, "the checkpoint", expected[key], _ARCH)
                present.append(name)
        if not present:
            key, _ = ckpt_location(row.megatron)
            raise mismatch(key, None, "the checkpoint", expected[key], _ARCH)
        found[row.megatron] = present
    for key, info in stored.items():
        if not key.startswith(MODEL_KEY_PREFIXES) or key in expected:
            continue
        if ignore_mtp and key.startswith("mtp."):
            continue
        raise mismatch(key, info.shape, "the checkpoint", None, f"{_ARCH} ({_describe(table)})")
    return found


def check_hf(
    table: MappingTable, shapes: dict[str, tuple[int, ...]], *, ignore_mtp_layers: bool = False
) -> list[str]:
    """Validate HF tensor shapes against the table; return the MTP copies that are absent.

    The MTP copies of the embedding and LM head are optional (transformers' own saves drop the
    whole MTP layer; some releases keep only its distinct tensors).
    """
    expected = table.hf_shapes(with_copies=True)
    arch = table.arch
    n_layers = arch.num_layers + (arch.mtp_num_layers if table.include_mtp else 0)
    layers = {i for i in map(_hf_layer, shapes) if i is not None}
    if ignore_mtp_layers:
        layers = {i for i in layers if i < arch.num_layers}
    side = f"config.json ({_describe(table)})"
    if layers != set(range(n_layers)):
        # A layer-count mismatch would otherwise surface as a confusing MTP/MoE shape error.
        extra = sorted(layers - set(range(n_layers)))
        if extra:
            name = next(n for n in shapes if _hf_layer(n) == extra[0])
            raise mismatch(name, shapes[name], "the HF checkpoint", None, side)
        missing = min(set(range(n_layers)) - layers)
        name = next(n for n in expected if _hf_layer(n) == missing)
        raise mismatch(name, None, "the HF checkpoint", expected[name], side)
    copies = set(table.copy_of)
    absent = []
    for name, shape in expected.items():
        if name not in shapes and name in copies:
            absent.append(name)
        elif name not in shapes or tuple(shapes[name]) != shape:
            raise mismatch(name, shapes.get(name), "the HF checkpoint", shape, side)
    for name, shape in shapes.items():
        if name in expected:
            continue
        if ignore_mtp_layers and (_hf_layer(name) or 0) >= arch.num_layers:
            continue
        raise mismatch(name, shape, "the HF checkpoint", None, side)
    return absent


_ARCH = "the recipe's architecture"


def _describe(table: MappingTable) -> str:
    a = table.arch
    mtp = a.mtp_num_layers if table.include_mtp else 0
    return f"{a.num_layers} layers + {mtp} MTP, {a.num_experts} experts, hidden {a.hidden_size}, vocab {a.vocab_size}"


def _hf_layer(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers":
        return int(parts[2])
    return None
