"""gearshift: supernet LLMs with a per-call placement of token mixers (FA, SWA, GDN, KDA)."""

from .cache import CacheError, SupernetCache
from .checkpoint import CheckpointError, thin
from .config import (
    AttentionConfig,
    ConfigError,
    GDNConfig,
    KDAConfig,
    LayerConfig,
    MLPConfig,
    RopeConfig,
    SupernetConfig,
)
from .model import Supernet
from .placement import PlacementError, placement_letters, resolve_placement
from .report import placement_report

__version__ = "0.1.0"

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
