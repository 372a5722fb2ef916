import pytest
import torch

from tests.tiny_models import TINY_MODELS


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny(request):
    return TINY_MODELS[request.param]
