"""Placement parsing: lists, letter strings, presets, shortcuts, and every error."""

import pytest

from gearshift.config import AttentionConfig, GDNConfig, LayerConfig, MLPConfig, SupernetConfig
from gearshift.placement import PlacementError, composition, placement_letters, resolve_placement


def test_forms(tiny_config):
    full = ("attention", "sliding_window", "gdn", "kda")
    assert resolve_placement("FSGK", tiny_config) == full
    assert resolve_placement("fsgk", tiny_config) == full
    assert resolve_placement(list(full), tiny_config) == full
    assert resolve_placement(["F", "sliding_window", "G", "kda"], tiny_config) == full
    assert resolve_placement(None, tiny_config) == ("attention",) * 4
    assert resolve_placement("gdn", tiny_config) == ("gdn",) * 4
    assert resolve_placement("all-kda", tiny_config) == ("kda",) * 4
    assert resolve_placement("fast", tiny_config, {"fast": "GGGS"}) == ("gdn", "gdn", "gdn", "sliding_window")
    assert placement_letters(full, tiny_config) == "FSGK"
    assert composition(resolve_placement("FFSG", tiny_config), tiny_config) == {
        "attention": 2,
        "sliding_window": 1,
        "gdn": 1,
        "kda": 0,
    }


@pytest.mark.parametrize(
    "spec, message",
    [
        ("FSG", "3 letters but the model has 4 layers"),
        (["attention"] * 5, "5 entries but the model has 4 layers"),
        ("nonsense", "unknown preset or placement 'nonsense'"),
        (["attention", "attention", "mamba", "gdn"], "layer 2: unknown mixer 'mamba'"),
        (["attention", 3, "gdn", "gdn"], "layer 1"),
    ],
)
def test_errors(tiny_config, spec, message):
    with pytest.raises(PlacementError, match=message):
        resolve_placement(spec, tiny_config)


def test_mixer_absent_from_layer_names_the_layer():
    attn = AttentionConfig(heads=2, head_groups=1, head_size=8)
    gdn = GDNConfig(value_heads=2, key_heads=1, key_head_dim=8, value_head_dim=8)
    mlp = MLPConfig(32)
    cfg = SupernetConfig(
        vocab_size=10,
        hidden_size=16,
        layers=(
            LayerConfig({"attention": attn, "gdn": gdn}, "attention", mlp),
            LayerConfig({"attention": attn}, "attention", mlp),
        ),
    )
    assert resolve_placement("GF", cfg) == ("gdn", "attention")
    with pytest.raises(PlacementError, match="layer 1: 'G' asks for a gdn mixer, which this layer does not hold"):
        resolve_placement("GG", cfg)
    with pytest.raises(PlacementError, match="layer 1: 'gdn' asks for a gdn mixer"):
        resolve_placement(["gdn", "gdn"], cfg)


def test_ambiguous_letter():
    a = AttentionConfig(heads=2, head_groups=1, head_size=8, window_size=4)
    b = AttentionConfig(heads=2, head_groups=1, head_size=8, window_size=16)
    cfg = SupernetConfig(vocab_size=10, hidden_size=16, layers=(LayerConfig({"w4": a, "w16": b}, "w4", MLPConfig(8)),))
    assert resolve_placement(["w16"], cfg) == ("w16",)
    with pytest.raises(PlacementError, match="ambiguous"):
        resolve_placement("S", cfg)


def test_model_presets(tiny_model):
    import copy

    model = copy.deepcopy(tiny_model)
    model.add_preset("balanced", "FSGK", note="test")
    assert model.resolve("balanced") == ("attention", "sliding_window", "gdn", "kda")
    with pytest.raises(PlacementError, match="known: balanced"):
        model.resolve("turbo")
    with pytest.raises(PlacementError):
        model.add_preset("bad name", "FFFF")
