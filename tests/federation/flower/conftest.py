"""Every Flower test keeps its node cache (the default folder under ``$FEDEXPERTS_CACHE``) in a temporary folder,
and a deployment test leaves no process behind."""

import time

import pytest


@pytest.fixture(autouse=True)
def _node_cache_in_a_temporary_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDEXPERTS_CACHE", str(tmp_path / "fedexperts-cache"))  # no Flower test uses the built-in model


@pytest.fixture
def no_leftover_processes():
    """Every process a deployment starts is stopped by PID when it ends (for the deployment tests)."""
    import psutil

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    deadline = time.monotonic() + 20
    while True:
        left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before and p.is_running()]
        left = [p for p in left if p.status() != psutil.STATUS_ZOMBIE]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not left, [" ".join(p.cmdline()[:3]) for p in left]
