"""One switch system: every GEARSHIFT_* variable typed, checked and read when used (gearshift.envs)."""

import os
import re
from pathlib import Path

import pytest
import torch

from gearshift import clitools, envs
from gearshift.ops import attention, compiled, dispatch, fused

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "name,text",
    [("BACKEND", "cuda"), ("SPLIT_KV", "-3"), ("SPLIT_KV", "many"), ("CUDNN_SDPA", "yes"), ("COMPILE", "2")],
)
def test_a_bad_value_names_the_variable(monkeypatch, name, text):
    monkeypatch.setenv(f"GEARSHIFT_{name}", text)
    with pytest.raises(ValueError, match=f"GEARSHIFT_{name}={text!r}"):
        getattr(envs, name)
    with pytest.raises(ValueError, match=f"GEARSHIFT_{name}"), envs.override(**{name: text}):
        pass
    assert os.environ[f"GEARSHIFT_{name}"] == text  # a refused override changes nothing


def test_unknown_switches_are_refused():
    with pytest.raises(AttributeError, match="no switch 'SPLITKV'"):
        envs.SPLITKV  # noqa: B018 - the access is the test
    with pytest.raises(ValueError, match="unknown switch"), envs.override(SPLITKV=0):
        pass


def test_values_are_typed_and_default_when_unset(monkeypatch):
    for switch in envs.SWITCHES.values():
        monkeypatch.delenv(switch.var, raising=False)
    assert envs.SPLIT_KV == -1 and envs.CUDNN_SDPA is None and envs.FLEX is True and envs.BACKEND == "auto"
    monkeypatch.setenv("GEARSHIFT_SPLIT_KV", "512")
    monkeypatch.setenv("GEARSHIFT_CUDNN_SDPA", "0")
    monkeypatch.setenv("GEARSHIFT_PROGRESS", "")  # empty: the default
    assert envs.SPLIT_KV == 512 and envs.CUDNN_SDPA is False and envs.PROGRESS is None


def test_override_restores_even_on_error(monkeypatch):
    monkeypatch.setenv("GEARSHIFT_SPLIT_KV", "64")
    monkeypatch.delenv("GEARSHIFT_CUDNN_SDPA", raising=False)
    with pytest.raises(RuntimeError), envs.override(SPLIT_KV=0, CUDNN_SDPA=True):
        assert envs.SPLIT_KV == 0 and envs.CUDNN_SDPA is True
        with envs.override(SPLIT_KV="auto"):
            assert envs.SPLIT_KV == -1
        assert envs.SPLIT_KV == 0
        raise RuntimeError
    assert os.environ["GEARSHIFT_SPLIT_KV"] == "64" and "GEARSHIFT_CUDNN_SDPA" not in os.environ


def test_assign_lasts_and_is_checked(monkeypatch):
    monkeypatch.delenv("GEARSHIFT_TRAIN_BACKEND", raising=False)
    with pytest.raises(ValueError, match="GEARSHIFT_TRAIN_BACKEND"):
        envs.assign(TRAIN_BACKEND="gpu")
    assert "GEARSHIFT_TRAIN_BACKEND" not in os.environ
    envs.assign(TRAIN_BACKEND="torch")
    assert envs.TRAIN_BACKEND == "torch" and os.environ["GEARSHIFT_TRAIN_BACKEND"] == "torch"  # children see it


def test_readers_see_a_value_set_after_import(monkeypatch):
    """Each module that honours a switch reads it at the call: no copy taken at import."""
    cpu, keys = torch.device("cpu"), torch.zeros(1, 2, 64, 4)
    monkeypatch.setenv("GEARSHIFT_SPLIT_KV", "16")
    assert attention._split_kv_chunk(keys) == 16
    monkeypatch.setenv("GEARSHIFT_SPLIT_KV", "0")
    assert attention._split_kv_chunk(keys) == 0
    monkeypatch.setenv("GEARSHIFT_CUDNN_SDPA", "1")
    assert attention.cudnn_allowed(8)
    monkeypatch.setenv("GEARSHIFT_CUDNN_SDPA", "0")
    assert not attention.cudnn_allowed(1 << 20)
    with attention.cudnn_sdpa(None):  # the context manager is an override: auto inside, "0" again after
        assert attention.cudnn_allowed(1 << 20) and not attention.cudnn_allowed(8)
    assert os.environ["GEARSHIFT_CUDNN_SDPA"] == "0"
    monkeypatch.setenv("GEARSHIFT_COMPILE", "1")
    with torch.no_grad():
        assert fused.fusion_active(cpu)
        monkeypatch.setenv("GEARSHIFT_COMPILE", "0")
        assert not fused.fusion_active(cpu)
    monkeypatch.setenv("GEARSHIFT_TRAIN_COMPILE", "0")
    assert not compiled.compile_enabled()
    with compiled.compilation(True):
        assert not compiled.compile_enabled()  # the variable overrules the block
    monkeypatch.setenv("GEARSHIFT_TRAIN_COMPILE", "1")
    assert compiled.compile_enabled()
    with compiled.compilation(False):
        assert not compiled.compile_enabled()
        with compiled.compilation(True):
            assert compiled.compile_enabled()  # the innermost block says
    monkeypatch.setenv("GEARSHIFT_PROGRESS", "0")
    assert clitools.progress_disabled() is True
    monkeypatch.setenv("GEARSHIFT_PROGRESS", "1")
    assert clitools.progress_disabled() is False
    monkeypatch.delenv("GEARSHIFT_PROGRESS")
    assert clitools.progress_disabled() is None


def test_use_backend_forces_training_too(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("GEARSHIFT_BACKEND", "fla")
    monkeypatch.setenv("GEARSHIFT_TRAIN_BACKEND", "fla")
    with dispatch.use_backend("torch"):
        assert dispatch.backend_for(cpu) == "torch" and dispatch.backend_for(cpu, training=True) == "torch"
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        dispatch.backend_for(cpu, training=True)  # restored
    with pytest.raises(ValueError, match="unknown backend"), dispatch.use_backend("cuda"):
        pass


def test_only_envs_reads_the_variables():
    """No module reads a GEARSHIFT_* variable (at import or later) but gearshift.envs."""
    src = ROOT / "src" / "gearshift"
    readers = []
    for path in src.rglob("*.py"):
        rel = path.relative_to(src).as_posix()
        if rel == "envs.py":
            continue
        text = path.read_text()
        if re.search(r"(os\.environ|getenv)[^\n]*[\"']GEARSHIFT_", text):
            readers.append(rel)
    assert not readers


def test_readme_lists_every_switch():
    """README.md's "Configuration" holds envs.table(now=False), as generated."""
    assert envs.table(now=False) in (ROOT / "README.md").read_text()
