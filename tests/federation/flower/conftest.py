"""Every Flower test keeps its node cache (the default folder under ``$FEDEXPERTS_CACHE``) in a temporary folder."""

import pytest


@pytest.fixture(autouse=True)
def _node_cache_in_a_temporary_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDEXPERTS_CACHE", str(tmp_path / "fedexperts-cache"))  # no Flower test uses the built-in model
