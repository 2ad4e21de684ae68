"""Minimal self-contained run_simulation test pattern (apps defined inline, result captured via closure)."""
import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation


def make_apps(num_rounds: int, results: list):
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        arr = msg.content["arrays"].to_numpy_ndarrays()[0] + pid
        return Message(RecordDict({"arrays": ArrayRecord([arr]),
                                   "m": MetricRecord({"pid": pid})}), reply_to=msg)

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        # Nodes register asynchronously: in run_simulation get_node_ids() can be [] at start!
        t0 = time.time()
        while len(nodes := sorted(grid.get_node_ids())) < 2:
            assert time.time() - t0 < 60, "nodes did not come up"
            time.sleep(0.1)
        g = np.zeros(3, np.float32)
        for rnd in range(1, num_rounds + 1):
            msgs = [Message(RecordDict({"arrays": ArrayRecord([g]),
                                        "config": ConfigRecord({"round": rnd})}),
                            dst_node_id=n, message_type=MessageType.TRAIN, group_id=str(rnd))
                    for n in nodes]
            replies = list(grid.send_and_receive(msgs, timeout=60))
            for r in replies:
                if r.has_error():
                    print("ERR", r.error.code, r.error.reason[-400:])
            replies = [r for r in replies if r.has_content()]
            g = np.mean([r.content["arrays"].to_numpy_ndarrays()[0] for r in replies], axis=0)
            results.append(g.tolist())   # ServerApp runs in a thread of THIS process

    return server, client


if __name__ == "__main__":
    t = time.time()
    results: list = []
    server, client = make_apps(2, results)
    run_simulation(server_app=server, client_app=client, num_supernodes=2,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "logging_level": "ERROR"}})
    assert results == [[0.5] * 3, [1.0] * 3], results
    print(f"INLINE OK {results} in {time.time() - t:.2f}s")
