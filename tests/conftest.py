"""Shared fixtures: an isolated model store, tiny random models of several architectures, swarms."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every process started by a test (servers too) uses this store; reuse one across runs with
# SWARMSHARD_TEST_HOME to skip re-converting the default model.
os.environ["SWARMSHARD_HOME"] = os.environ.get("SWARMSHARD_TEST_HOME") or tempfile.mkdtemp(prefix="swarmshard-test-")

from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()


@pytest.fixture(scope="session")
def store_home() -> str:
    return os.environ["SWARMSHARD_HOME"]


@pytest.fixture(scope="session")
def store(store_home):
    from swarmshard.core.store import ModelStore

    return ModelStore(store_home)


@pytest.fixture(scope="session")
def smollm2(store):
    """The real default model, converted into the test store."""
    return store.resolve("smollm2-135m", progress=False)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Small random-initialised causal LMs of different architectures, saved as transformers dirs."""
    from tests.tiny_models import save_tiny_models

    return save_tiny_models(tmp_path_factory.mktemp("tiny-models"))
