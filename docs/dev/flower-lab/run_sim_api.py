"""(a) flwr.simulation.run_simulation Python API with the toy app."""
import sys
import time

t0 = time.time()
from flwr.app import Context  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

sys.path.insert(0, "/tmp/flwr-lab/toyapp")
from toyapp.client_app import app as client_app  # noqa: E402
from toyapp.server_app import app as server_app  # noqa: E402

t_import = time.time()
backend_config = {
    "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
    "init_args": {"num_cpus": 2, "logging_level": "ERROR", "log_to_driver": True},
}
run_simulation(
    server_app=server_app,
    client_app=client_app,
    num_supernodes=2,
    backend_config=backend_config,
)
print(f"IMPORT {t_import - t0:.2f}s  RUN_SIMULATION {time.time() - t_import:.2f}s", flush=True)
