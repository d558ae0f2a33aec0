"""gearshift: supernet LLMs with a per-call placement of token mixers (FA, SWA, GDN, KDA).

The names below load on first use (PEP 562), so ``import gearshift`` and the command line's ``--help`` do not
pay for torch until something needs it.
"""

from importlib import import_module

__version__ = "0.1.0"

# name -> the submodule that defines it
_LAZY = {
    "AttentionConfig": "config",
    "ConfigError": "config",
    "GDNConfig": "config",
    "KDAConfig": "config",
    "LayerConfig": "config",
    "MLPConfig": "config",
    "RopeConfig": "config",
    "SupernetConfig": "config",
    "PlacementError": "placement",
    "placement_letters": "placement",
    "resolve_placement": "placement",
    "CacheError": "cache",
    "SupernetCache": "cache",
    "CheckpointError": "checkpoint",
    "thin": "model",
    "Supernet": "model",
    "placement_report": "roofline",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "AttentionConfig",
    "CacheError",
    "CheckpointError",
    "ConfigError",
    "GDNConfig",
    "KDAConfig",
    "LayerConfig",
    "MLPConfig",
    "RopeConfig",
    "Supernet",
    "SupernetCache",
    "SupernetConfig",
    "PlacementError",
    "placement_letters",
    "placement_report",
    "resolve_placement",
    "thin",
]
