"""fedexperts on Flower: a ServerApp and a ClientApp over the same algorithms and client step.

Importing this package needs ``flwr`` (``pip install 'fedexperts[flower]'``). It turns off
Flower's telemetry, update checks and runtime dependency installation (which would ``uv sync``
from the network on every run) unless the environment already says otherwise.
"""

import os

for _name, _value in (
    ("FLWR_TELEMETRY_ENABLED", "0"),
    ("FLWR_DISABLE_UPDATE_CHECK", "1"),
    ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1"),
    ("RAY_USAGE_STATS_ENABLED", "0"),
    ("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0"),
):
    os.environ.setdefault(_name, _value)

from fedexperts.federation.flower.clientapp import client_app  # noqa: E402
from fedexperts.federation.flower.runconfig import config_from_run_config, config_to_run_config  # noqa: E402
from fedexperts.federation.flower.serverapp import FlowerTransport, run_on_grid, server_app  # noqa: E402
from fedexperts.federation.flower.simulation import run_simulation  # noqa: E402

__all__ = [
    "FlowerTransport",
    "client_app",
    "config_from_run_config",
    "config_to_run_config",
    "run_on_grid",
    "run_simulation",
    "server_app",
]
