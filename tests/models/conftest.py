import pytest
import torch


@pytest.fixture
def cudnn_sdp_restored():
    """Restores torch SDPA's process-wide cuDNN switch (``models.disable_cudnn_sdpa`` turns it off)."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    yield
    torch.backends.cuda.enable_cudnn_sdp(before)
