"""Fixtures shared by the unit tests."""

import logging

import pytest


@pytest.fixture
def fake_cuda(monkeypatch):
    """fake_cuda(major, minor): vLLM's platform reads as a CUDA GPU of that capability."""
    from vllm.platforms import current_platform
    from vllm.platforms.interface import DeviceCapability

    # Imported while the platform is still itself: it imports modules that read it at import.
    import vllm_ampere.attention.backend  # noqa: F401

    def set_capability(major, minor):
        monkeypatch.setattr(current_platform, "is_cuda", lambda: True)
        # A classmethod on the platform class: is_device_capability_family reads it through cls.
        monkeypatch.setattr(type(current_platform), "get_device_capability",
                            classmethod(lambda cls, device_id=0: DeviceCapability(major, minor)))
    return set_capability


@pytest.fixture
def moe_w4a16_warnings():
    """A function giving the messages moe_w4a16's logger warned so far in the test. The handler
    sits on that logger itself: once vllm_ampere.register() has run in this process, our records
    go up through vLLM's logger, which does not propagate to pytest's root handler (caplog)."""
    from vllm_ampere.quant import moe_w4a16

    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    moe_w4a16.logger.addHandler(handler)
    yield lambda: [r.getMessage() for r in records]
    moe_w4a16.logger.removeHandler(handler)
