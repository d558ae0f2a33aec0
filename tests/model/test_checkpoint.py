"""Apriel2 checkpoints: round trips, sharding, pattern/plain layers written by hand, thinning, bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from gearshift.checkpoint import CheckpointError
from gearshift.config import SupernetConfig
from gearshift.model import Supernet, thin

ALL = ["FFFF", "SSSS", "GGGG", "KKKK", "FSGK", "KGSF"]


def logits(model, placement, seed=0):
    x = torch.randint(0, model.config.vocab_size, (2, 14), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x, placement)


def test_round_trip_every_placement(tiny_model, tmp_path):
    tiny_model.add_preset("mixed", "FSGK", speedup=1.7)
    try:
        tiny_model.save_pretrained(tmp_path)
    finally:
        tiny_model.presets.pop("mixed"), tiny_model.preset_meta.pop("mixed")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "apriel2_text" and cfg["decoder"]["type"] == "fixed"
    block = cfg["decoder"]["block"]
    assert block["mixer"]["type"] == "stochastic"
    assert set(block["mixer"]["mixers"]) == {"attention", "sliding_window", "gdn", "kda"}
    assert block["mixer"]["mixers"]["attention"]["rotary"]["type"] == "mistral_1d"
    keys = load_file(tmp_path / "model.safetensors").keys()
    for name in (
        "model.decoder.blocks.0.mixer.mixers.gdn.in_proj_qkvz.weight",
        "model.decoder.blocks.0.mixer.mixers.gdn.convolution.weight",
        "model.decoder.blocks.3.mixer.mixers.kda.q_conv.weight",
        "model.decoder.blocks.1.mixer.mixers.sliding_window.o_proj.weight",
        "model.embed_tokens.weight",
        "lm_head.weight",
    ):
        assert name in keys
    loaded = Supernet.from_pretrained(tmp_path)
    assert loaded.presets["mixed"] == ("attention", "sliding_window", "gdn", "kda")
    assert loaded.preset_meta["mixed"]["speedup"] == 1.7
    for p in ALL:
        torch.testing.assert_close(logits(loaded, p), logits(tiny_model, p), atol=0, rtol=0)
    torch.testing.assert_close(logits(loaded, "mixed"), logits(tiny_model, "FSGK"), atol=0, rtol=0)


def test_sharded_and_tied_bf16(tmp_path):
    cfg = SupernetConfig.tiny(num_layers=3, tie_word_embeddings=True)
    model = Supernet.random(cfg, seed=1, std=0.1)
    model.save_pretrained(tmp_path, max_shard_size=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert "lm_head.weight" not in index["weight_map"]
    loaded = Supernet.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16 and loaded.lm_head is None
    torch.testing.assert_close(logits(loaded.float(), "FSG"), logits(model, "FSG"), atol=0.05, rtol=0.05)
    # re-saving with one shard removes the old shards and index
    loaded.float().save_pretrained(tmp_path)
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert [p.name for p in tmp_path.glob("*.safetensors")] == ["model.safetensors"]


def hand_written_pattern_checkpoint(model, path):
    """A pattern decoder in which layer 0 is a plain attention layer and layer 2 a plain GDN layer."""

    def mixer_cfg(kind):
        c = model.config.layers[0].mixers[kind]
        if kind == "gdn":
            return {
                "type": "gdn",
                "value_heads": c.value_heads,
                "key_heads": c.key_heads,
                "key_head_dim": c.key_head_dim,
                "value_head_dim": c.value_head_dim,
                "convolution_layer": {"kernel_size": c.conv_kernel},
            }
        if kind == "kda":
            return {"type": "kda", "heads": c.heads, "head_dim": c.head_dim, "convolution_layer": {"kernel_size": 4}}
        out = {
            "type": "attention",
            "heads": c.heads,
            "head_groups": c.head_groups,
            "head_size": c.head_size,
            "rotary": {"type": "mistral_1d", "theta": c.rope.theta},
        }
        if c.window_size:
            out["window_size"] = c.window_size
        return out

    mlp = {
        "type": "mlp",
        "intermediate_size": model.config.layers[0].mlp.intermediate_size,
        "activation": "silu",
        "gated": True,
    }
    norm = {"type": "rms_norm", "epsilon": 1e-5}
    config = {
        "model_type": "apriel2_text",
        "architectures": ["Apriel2ForCausalLM"],
        "hidden_size": model.config.hidden_size,
        "vocab_size": model.config.vocab_size,
        "tie_word_embeddings": False,
        "embeddings": {"max_position_embeddings": model.config.max_position_embeddings},
        "head": {"normalization": {"type": "rms_norm", "epsilon": 1e-5}},
        "decoder": {
            "type": "pattern",
            "num_blocks": 4,
            "pattern": ["attn", "super", "gdn", "super"],
            "blocks": {
                "attn": {"mixer": mixer_cfg("attention"), "mlp": mlp, "normalization": norm},
                "gdn": {"mixer": mixer_cfg("gdn"), "mlp": mlp, "normalization": norm},
                "super": {
                    "mixer": {
                        "type": "stochastic",
                        "main_mixer_name": "kda",
                        "mixers": {k: mixer_cfg(k) for k in ("sliding_window", "kda")},
                    },
                    "mlp": mlp,
                    "normalization": norm,
                },
            },
        },
    }
    tensors = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if "mixers" in parts:
            layer, name = int(parts[3]), parts[6]
            if layer in (0, 2):
                if (layer, name) not in ((0, "attention"), (2, "gdn")):
                    continue
                key = ".".join(parts[:5] + parts[7:])  # plain layer: ...blocks.{i}.mixer.<param>
            elif name not in ("sliding_window", "kda"):
                continue
        tensors[key] = value.contiguous()
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "model.safetensors"))
    return config, tensors


def test_pattern_checkpoint_with_plain_layers_loads(tiny_model, tmp_path):
    hand_written_pattern_checkpoint(tiny_model, tmp_path)
    loaded = Supernet.from_pretrained(tmp_path)
    assert loaded.resolve(None) == ("attention", "kda", "gdn", "kda")
    assert loaded.resolve("FSGS") == ("attention", "sliding_window", "gdn", "sliding_window")
    for p in ("FKGK", "FSGS", "FSGK"):
        torch.testing.assert_close(logits(loaded, p), logits(tiny_model, p), atol=0, rtol=0)
    # written back as a pattern of stochastic blocks, and loads again
    loaded.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["decoder"]["type"] == "pattern" and len(again["decoder"]["blocks"]) == 3
    torch.testing.assert_close(logits(Supernet.from_pretrained(tmp_path / "again"), "FSGK"), logits(tiny_model, "FSGK"))


def test_thinning_keeps_exactly_the_needed_tensors(tiny_model, tmp_path):
    keep = ["FSGK", "FFGG"]
    tiny_model.add_preset("kept", "FSGG")
    tiny_model.add_preset("dropped", "KKKK")
    try:
        thin(tiny_model, keep, tmp_path)
    finally:
        for n in ("kept", "dropped"):
            tiny_model.presets.pop(n), tiny_model.preset_meta.pop(n)
    names = load_file(tmp_path / "model.safetensors").keys()
    mixer_keys = {tuple(k.split(".")[3:7:3]) for k in names if ".mixers." in k}
    assert mixer_keys == {
        ("0", "attention"),
        ("1", "sliding_window"),
        ("1", "attention"),
        ("2", "gdn"),
        ("3", "kda"),
        ("3", "gdn"),
    }
    expected_shared = {k for k in tiny_model.state_dict() if ".mixers." not in k}
    assert expected_shared <= set(names)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["decoder"]["type"] == "pattern"
    thinned = Supernet.from_pretrained(tmp_path)
    assert set(thinned.presets) == {"kept"}
    assert thinned.num_parameters(all_mixers=True) < tiny_model.num_parameters(all_mixers=True)
    for p in keep + ["FSGG"]:
        torch.testing.assert_close(logits(thinned, p), logits(tiny_model, p), atol=0, rtol=0)
    with pytest.raises(ValueError, match="layer 0"):
        thinned.resolve("KKKK")


def test_thinning_in_memory_matches_the_thinned_checkpoint(tiny_model, tmp_path):
    """``Supernet.thin_`` (what ``gearshift serve --only-presets`` does after loading) drops the same mixers and
    presets as ``thin`` writes, in place, and leaves the kept placements' logits unchanged."""
    keep = ["FSGK", "FFGG"]
    model = Supernet(tiny_model.config)
    model.load_state_dict(tiny_model.state_dict())
    model.add_preset("kept", "FSGG")
    model.add_preset("dropped", "KKKK")
    thin(model, keep, tmp_path)
    before = {p: logits(model, p) for p in keep + ["FSGG"]}
    assert model.thin_(keep) is model
    assert model.state_dict().keys() == Supernet.from_pretrained(tmp_path).state_dict().keys()
    assert set(model.presets) == set(model.preset_meta) == {"kept"}
    for p, want in before.items():
        torch.testing.assert_close(logits(model, p), want, atol=0, rtol=0)
    with pytest.raises(ValueError, match="layer 0"):
        model.resolve("KKKK")
    with pytest.raises(ValueError, match="at least one"):
        model.thin_([])


def write(path, config, tensors):
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if tensors is not None:
        save_file(tensors, str(path / "model.safetensors"))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c, t: ("{not json", t), "not valid JSON"),
        (lambda c, t: ({**c, "model_type": "llama"}, t), "not an Apriel2 model"),
        (lambda c, t: ({k: v for k, v in c.items() if k != "decoder"}, t), "missing required field 'decoder'"),
        (lambda c, t: (_set(c, ["decoder", "blocks", "gdn", "mixer"], {"type": "mamba"}), t), "mamba"),
        (lambda c, t: (_set(c, ["decoder", "blocks", "gdn", "mixer", "type"], "hyena"), t), "unknown mixer type"),
        (lambda c, t: (_set(c, ["decoder", "pattern"], ["attn", "nope"]), t), "undefined blocks"),
        (lambda c, t: (_del(c, ["decoder", "blocks", "attn", "mixer", "rotary"]), t), "rotary"),
        (lambda c, t: (_set(c, ["decoder", "blocks", "attn", "mixer", "rotary", "type"], "yarn"), t), "yarn"),
        (lambda c, t: (_set(c, ["decoder", "blocks", "attn", "mixer", "heads"], 3), t), "multiple of head_groups"),
        (
            lambda c, t: (c, {k: v for k, v in t.items() if k != "model.decoder.blocks.2.mixer.A_log"}),
            "tensors missing",
        ),
        (lambda c, t: (c, {**t, "model.decoder.blocks.0.mixer.extra.weight": torch.zeros(1)}), "unexpected"),
        (lambda c, t: (c, {**t, "model.norm.weight": torch.zeros(3)}), "has shape"),
    ],
)
def test_malformed_checkpoints(tiny_model, tmp_path, mutate, message):
    config, tensors = hand_written_pattern_checkpoint(tiny_model, tmp_path / "ok")
    config, tensors = mutate(json.loads(json.dumps(config)), dict(tensors))
    write(tmp_path / "bad", config, tensors)
    with pytest.raises(CheckpointError, match=message):
        Supernet.from_pretrained(tmp_path / "bad")


def test_missing_and_corrupt_files(tiny_model, tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        Supernet.from_pretrained(tmp_path)
    config, _ = hand_written_pattern_checkpoint(tiny_model, tmp_path / "ok")
    write(tmp_path / "noweights", config, None)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        Supernet.from_pretrained(tmp_path / "noweights")
    (tmp_path / "noweights" / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match="cannot read"):
        Supernet.from_pretrained(tmp_path / "noweights")
    (tmp_path / "ok" / "presets.json").write_text(json.dumps({"presets": {"p": {"placement": "FF"}}}))
    with pytest.raises(CheckpointError, match="preset 'p'"):
        Supernet.from_pretrained(tmp_path / "ok")


def _set(d, path, value):
    cur = d
    for key in path[:-1]:
        cur = cur[key]
    cur[path[-1]] = value
    return d


def _del(d, path):
    cur = d
    for key in path[:-1]:
        cur = cur[key]
    del cur[path[-1]]
    return d
