"""Shared pytest fixtures."""

from __future__ import annotations

import os

import pytest

from tests.fakedata import SMALL_OVERRIDES, write_all


@pytest.fixture(scope="session")
def fake_data_dir(tmp_path_factory):
    """A ``paths.data_dir`` holding every dataset in its real on-disk format, small (see tests/fakedata.py).

    Use with ``fake_data_overrides`` so the default data configs fit it, e.g.
    ``["paths.data_dir=" + str(fake_data_dir), "data=cifar10", *fake_data_overrides]``.
    """
    return write_all(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def fake_data_overrides():
    """Hydra overrides (batch size, validation share, workers) that fit the data of ``fake_data_dir``."""
    return list(SMALL_OVERRIDES)


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch):
    """Every test logs to W&B offline and quietly: nothing may need an account or the network."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _no_inherited_wandb_service():
    """An in-process ``wandb.init`` leaves ``WANDB_SERVICE`` (a socket of this process's W&B service)
    in os.environ; a flowlab command started later as a subprocess would inherit it and talk to a
    service that is not its own. Every test starts and ends without it, like a new shell."""
    os.environ.pop("WANDB_SERVICE", None)
    yield
    os.environ.pop("WANDB_SERVICE", None)
