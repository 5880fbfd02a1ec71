"""Fixtures shared by the engine's tests (tests/host has its own conftest)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from trainer.tiny import tiny_text_encoder, tiny_transformer


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module: deterministic, and far faster on small matmuls than two threads
    fighting other processes for two cores. Modules opt in with `pytestmark = usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def source() -> torch.nn.Module:
    """The seeded tiny transformer (fp32); tests must not change it."""
    return tiny_transformer(0)


@pytest.fixture(scope="module")
def embeds() -> list[torch.Tensor]:
    """Text embeddings of two prompts from the tiny text encoder."""
    return tiny_text_encoder(0).encode(["a red fox in the snow", "a cat"])
