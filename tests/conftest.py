import pytest
import torch

from gearshift.config import SupernetConfig
from gearshift.model import Supernet

# tiny shapes: one thread avoids OpenMP spin-waits, which cost more than the math (and slow a shared CI box)
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_config() -> SupernetConfig:
    # window 6 < the sequences used in tests, so SWA really slides
    return SupernetConfig.tiny(num_layers=4, vocab_size=97, window=6)


@pytest.fixture(scope="session")
def tiny_model(tiny_config) -> Supernet:
    # a large init std so that mixers differ visibly in the logits
    return Supernet.random(tiny_config, seed=0, std=0.2).eval()
