"""ClientApp: adds its partition-id to the received array."""
import os
import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    nparts = int(context.node_config["num-partitions"])
    cfg = msg.content["config"]  # ConfigRecord sent by server (per-node content)
    rnd = int(cfg["round"])

    # context.state persists across messages of the same run on this node
    calls = context.state.get("calls", MetricRecord({"n": 0}))
    calls["n"] = int(calls["n"]) + 1
    context.state["calls"] = calls

    print(f"[client] node_id={context.node_id} node_config={dict(context.node_config)} "
          f"run_config={dict(context.run_config)} calls={int(calls['n'])}", flush=True)
    if int(context.run_config.get("fail-partition", os.environ.get("TOY_FAIL_PARTITION", -1))) == pid:
        raise RuntimeError(f"deliberate failure on partition {pid}")

    if int(context.run_config.get("slow-partition", -1)) == pid:
        time.sleep(float(context.run_config.get("slow-seconds", 0.0)))

    arr = msg.content["arrays"].to_numpy_ndarrays()[0]
    new = arr + pid
    reply = RecordDict(
        {
            "arrays": ArrayRecord([new]),
            "metrics": MetricRecord(
                {"partition-id": pid, "num-partitions": nparts, "round": rnd,
                 "calls": int(calls["n"]), "pid": os.getpid(),
                 "server-said": float(cfg["secret"])}
            ),
            "info": ConfigRecord({"node-id": str(context.node_id),
                                  "run-id": str(context.run_id)}),
        }
    )
    return Message(content=reply, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    return Message(
        content=RecordDict({"m": MetricRecord({"partition-id": int(context.node_config["partition-id"])})}),
        reply_to=msg,
    )
