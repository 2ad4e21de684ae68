"""run_simulation: call twice in one process; try a non-ray backend_name."""
import sys, time
sys.path.insert(0, "/tmp/flwr-lab/toyapp")
from flwr.simulation import run_simulation
from toyapp.client_app import app as client_app
from toyapp.server_app import app as server_app
bc = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}}
for i, backend in enumerate(["ray", "ray", sys.argv[1] if len(sys.argv) > 1 else "ray"]):
    t = time.time()
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=2,
                       backend_name=backend, backend_config=bc)
        print(f"CALL {i} backend={backend!r} OK {time.time()-t:.2f}s", flush=True)
    except BaseException as e:
        print(f"CALL {i} backend={backend!r} FAILED {type(e).__name__}: {e} {time.time()-t:.2f}s", flush=True)
