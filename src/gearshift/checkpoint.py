"""Checkpoint directories: config, weights and presets in and out, files written atomically, and the tokenizer
that travels with them.

A checkpoint is an Apriel2 directory (``apriel2.py`` maps its config and tensor names): ``config.json``, one
``model.safetensors`` or shards with ``model.safetensors.index.json``, and ``presets.json`` beside the weights
(Apriel2 has no placement field; their loader ignores it). Nothing here builds a model: ``Supernet.from_pretrained``
and ``save_pretrained`` (``model.py``) pass state dicts and configs through these functions.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .apriel2 import IGNORED_PREFIXES, CheckpointError, config_from_apriel2, config_to_apriel2, internal_key
from .config import LayerConfig, SupernetConfig
from .placement import placement_letters, resolve_placement

if TYPE_CHECKING:  # torch and safetensors load with the first weights: reading a config needs neither
    import torch

__all__ = [
    "CONFIG_NAME",
    "PRESETS_NAME",
    "TOKENIZER_FILES",
    "CheckpointError",
    "fingerprint",
    "load_tokenizer",
    "preset_entries",
    "preset_entry",
    "read_config",
    "read_presets",
    "read_state",
    "restrict_mixers",
    "token_ids",
    "write_checkpoint",
]

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PRESETS_NAME = "presets.json"
# Files that travel with a checkpoint when it is rewritten or thinned (tokenizer, chat template, generation).
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


# ---------------------------------------------------------------------------------------------- reading


def _weight_files(path: Path) -> list[Path]:
    index = path / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: malformed index ({exc})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise CheckpointError(f"{path}: index names missing shard files {missing}")
        return [path / f for f in files]
    if (path / SINGLE_NAME).exists():
        return [path / SINGLE_NAME]
    raise CheckpointError(f"{path}: no {SINGLE_NAME} or {INDEX_NAME} found")


def read_config(path: str | Path) -> tuple[SupernetConfig, list[bool]]:
    path = Path(path)
    file = path / CONFIG_NAME
    if not file.exists():
        raise CheckpointError(f"{path}: no {CONFIG_NAME} (is this a checkpoint directory?)")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return config_from_apriel2(raw)


def read_presets(path: str | Path) -> dict[str, dict[str, Any]]:
    file = Path(path) / PRESETS_NAME
    if not file.exists():
        return {}
    try:
        data = json.loads(file.read_text())
        presets = data["presets"]
        if not isinstance(presets, dict) or not all("placement" in p for p in presets.values()):
            raise TypeError("each preset needs a 'placement'")
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{file}: malformed presets file ({exc})") from None
    return presets


def fingerprint(path: str | Path, *, samples: int = 16, sample_bytes: int = 4096) -> str:
    """A short hash that tells checkpoints apart: the config and, per tensor, its name, dtype, shape and bytes
    sampled at ``samples`` evenly spaced places (all of a small tensor). Training changes every trained tensor, so
    two checkpoints of one run differ; reading costs a few seeks per tensor, not the whole 30 GB.
    Presets, tokenizer and other side files do not count (adding a preset does not change a measurement)."""
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not cfg_file.exists():
        raise CheckpointError(f"{path}: no {CONFIG_NAME} (is this a checkpoint directory?)")
    h = hashlib.sha256()
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({exc})") from None
    h.update(json.dumps(config, sort_keys=True).encode())
    tensors: dict[str, bytes] = {}  # name -> digest of its sample (sorted below: sharding does not matter)
    for file in _weight_files(path):
        with open(file, "rb") as f:
            try:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise CheckpointError(f"{file}: cannot read safetensors header ({exc})") from None
            base = 8 + n
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                t = hashlib.sha256(json.dumps([name, entry["dtype"], entry["shape"]]).encode())
                begin, end = entry["data_offsets"]
                size = end - begin
                if size <= samples * sample_bytes:
                    f.seek(base + begin)
                    t.update(f.read(size))
                else:
                    step = (size - sample_bytes) // (samples - 1)
                    for k in range(samples):
                        f.seek(base + begin + k * step)
                        t.update(f.read(sample_bytes))
                tensors[name] = t.digest()
    for name in sorted(tensors):
        h.update(tensors[name])
    return h.hexdigest()[:16]


def read_state(
    path: str | Path,
    config: SupernetConfig,
    stochastic: list[bool],
    shapes: Mapping[str, Sequence[int]],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    partial: bool = False,
) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint directory under gearshift's names, checked against ``shapes`` (name -> shape of
    the model that ``config`` builds, e.g. its state dict on the meta device).

    ``dtype`` casts every tensor (default: as stored). ``partial``: ``config`` keeps only some of the stored mixers
    (``restrict_mixers``), so tensors of the others are skipped, not unexpected. Missing, unexpected or mis-shaped
    tensors raise ``CheckpointError``.
    """
    from safetensors import safe_open

    path = Path(path)
    state: dict[str, torch.Tensor] = {}
    unexpected = []
    for file in _weight_files(path):
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                    if key.startswith(IGNORED_PREFIXES):
                        continue
                    ikey = internal_key(key, stochastic, config)
                    if ikey not in shapes:
                        if partial and ".mixers." in ikey:
                            continue  # a mixer the caller chose to drop
                        unexpected.append(key)
                        continue
                    t = f.get_tensor(key)
                    if tuple(t.shape) != tuple(shapes[ikey]):
                        raise CheckpointError(
                            f"{file.name}: tensor {key} has shape {tuple(t.shape)}, the config implies "
                            f"{tuple(shapes[ikey])}"
                        )
                    state[ikey] = t if dtype is None else t.to(dtype)
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for corrupt files
            raise CheckpointError(f"{file}: cannot read safetensors file ({exc})") from None
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        if "lm_head.weight" in unexpected:
            unexpected.remove("lm_head.weight")
    missing = sorted(set(shapes) - set(state))
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensors missing, e.g. {missing[:5]}")
    if unexpected:
        raise CheckpointError(f"{path}: {len(unexpected)} unexpected tensors, e.g. {unexpected[:5]}")
    return state


def restrict_mixers(cfg: SupernetConfig, keep: Iterable[str]) -> SupernetConfig:
    """``cfg`` keeping only the mixers named in ``keep`` (to save memory when serving a subset); a layer's main
    mixer falls back to its first kept one."""
    keep = set(keep)
    layers = []
    for i, layer in enumerate(cfg.layers):
        mixers = {n: m for n, m in layer.mixers.items() if n in keep}
        if not mixers:
            raise CheckpointError(f"layer {i}: none of the requested mixers {sorted(keep)} is held by this layer")
        main = layer.main_mixer if layer.main_mixer in mixers else next(iter(mixers))
        layers.append(LayerConfig(mixers=mixers, main_mixer=main, mlp=layer.mlp))
    return cfg.replace(layers=tuple(layers))


# ---------------------------------------------------------------------------------------------- writing


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = size.strip().upper()
    for unit, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def _standalone(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous and owning its storage: safetensors refuses tensors that share memory, as the parts of
    weights laid out together do (``Supernet.fuse_projections_``)."""
    import torch

    whole = t.untyped_storage().nbytes() == t.numel() * t.element_size()
    return t.contiguous() if whole else t.clone(memory_format=torch.contiguous_format)


def write_checkpoint(
    path: str | Path,
    config: SupernetConfig,
    state: Mapping[str, torch.Tensor],
    presets: Mapping[str, Any],
    *,
    known_presets: Mapping[str, Sequence[str]] | None = None,
    max_shard_size: int | str = "5GB",
    copy_from: str | Path | None = None,
) -> None:
    """Write ``state`` (gearshift's tensor names) and ``config`` as an Apriel2 checkpoint directory; files appear
    atomically (temp dir, then rename).

    ``presets``: name -> placement, or name -> dict with a 'placement' and any metadata; placements may name the
    ``known_presets``. ``copy_from`` copies tokenizer/chat-template files from another checkpoint.

    Like transformers' ``save_pretrained``, writing into a directory that holds a checkpoint replaces it (its
    weights, index and presets; other files stay): the Python API trusts its caller. The command line asks for
    ``--overwrite`` first (``gearshift.clitools.check_output_dir``).
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: _standalone(v.detach()) for k, v in state.items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += nbytes
    dtype = next(iter(state.values())).dtype if state else None
    tmp = Path(tempfile.mkdtemp(prefix=".gearshift-save-", dir=path))
    try:
        names = (
            [SINGLE_NAME]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        for name, shard in zip(names, shards, strict=True):
            save_file({k: v.cpu() for k, v in shard.items()}, str(tmp / name), metadata={"format": "pt"})
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                "weight_map": {k: name for name, shard in zip(names, shards, strict=True) for k in sorted(shard)},
            }
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
        (tmp / CONFIG_NAME).write_text(json.dumps(config_to_apriel2(config, dtype), indent=2))
        entries = preset_entries(presets, config, known_presets)
        if entries:
            (tmp / PRESETS_NAME).write_text(json.dumps({"presets": entries}, indent=2))
        if copy_from is not None:
            for name in SIDE_FILES:
                src = Path(copy_from) / name
                if src.exists() and src.resolve() != (path / name).resolve():
                    shutil.copy2(src, tmp / name)
        # Replace: stale weights first (so no mix of old and new shards is ever indexed), then move new files in.
        new = {p.name for p in tmp.iterdir()}
        for old in list(path.glob("*.safetensors")) + [path / INDEX_NAME, path / PRESETS_NAME]:
            if old.exists() and old.name not in new:
                old.unlink()
        for p in sorted(tmp.iterdir(), key=lambda p: p.name == CONFIG_NAME):  # config.json last
            os.replace(p, path / p.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def preset_entry(placement: Sequence[str], config: SupernetConfig, meta: Mapping[str, Any] | None = None) -> dict:
    """The presets.json form of one resolved placement: its metadata, mixer names and letter string."""
    return {**(meta or {}), "placement": list(placement), "letters": placement_letters(placement, config)}


def preset_entries(
    presets: Mapping[str, Any], config: SupernetConfig, known: Mapping[str, Sequence[str]] | None = None
) -> dict[str, dict[str, Any]]:
    """The presets.json form of ``presets`` (name -> placement, or name -> dict with a 'placement' and metadata),
    each placement resolved against ``config`` and the ``known`` presets."""
    out = {}
    for name, entry in presets.items():
        info = dict(entry) if isinstance(entry, Mapping) else {"placement": entry}
        placement = resolve_placement(info.pop("placement"), config, known)
        info.pop("letters", None)
        out[name] = preset_entry(placement, config, info)
    return out


# ---------------------------------------------------------------------------------------------- tokenizer


def load_tokenizer(path: str | Path):
    """The Hugging Face tokenizer stored with a checkpoint (it travels with it from ``gearshift convert``), or None
    when the directory holds no tokenizer files."""
    directory = Path(path)
    if not any((directory / f).exists() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # it reads config.json, sees the unknown model type apriel2_text and warns
    try:
        return AutoTokenizer.from_pretrained(directory)
    finally:
        hf_logging.set_verbosity(level)


def token_ids(encoded) -> list[int]:
    """Token ids from a tokenizer's output: a list, or (transformers 5, chat templates) an encoding with input_ids."""
    if hasattr(encoded, "keys") and "input_ids" in encoded:
        encoded = encoded["input_ids"]
    return [int(x) for x in encoded]
