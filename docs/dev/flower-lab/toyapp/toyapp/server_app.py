"""ServerApp: custom loop over Grid with per-node messages."""
import json
import time
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

app = ServerApp()

# run_simulation() (Python API) passes an EMPTY run_config -> keep defaults in code.
DEFAULTS = {"num-rounds": 2, "array-size": 4, "fail-partition": -1,
            "reply-timeout": 60.0, "expect-nodes": 2, "server-fail": False,
            "poll-interval": 0.0}


def send_and_receive_fast(grid: Grid, msgs: list, timeout: float, poll: float) -> list:
    """Like grid.send_and_receive but polls every `poll` s (HttpGrid hardcodes 3 s)."""
    ids = set(grid.push_messages(msgs))
    end = time.time() + timeout
    out: list = []
    while ids and time.time() < end:
        got = list(grid.pull_messages(ids))
        out.extend(got)
        ids.difference_update(m.metadata.reply_to_message_id for m in got)
        if ids:
            time.sleep(poll)
    return out


def _msg_bytes(rd: RecordDict) -> int:
    """Exact payload bytes of all arrays in a RecordDict (serialized .npy bytes)."""
    return sum(len(a.data) for rec in rd.array_records.values() for a in rec.values())


@app.main()
def main(grid: Grid, context: Context) -> None:
    t0 = time.time()
    cfg = {**DEFAULTS, **context.run_config}
    num_rounds = int(cfg["num-rounds"])
    size = int(cfg["array-size"])
    timeout = float(cfg["reply-timeout"])
    expect = int(cfg["expect-nodes"])
    log(INFO, "run_config=%s node_id=%s run_id=%s", dict(cfg), context.node_id, context.run_id)

    # Wait for nodes (deployment: SuperNodes may still be connecting)
    node_ids: list[int] = []
    while len(node_ids) < expect:
        node_ids = sorted(grid.get_node_ids())
        if time.time() - t0 > 120:
            raise RuntimeError(f"only {len(node_ids)} nodes connected")
        if len(node_ids) < expect:
            time.sleep(0.5)
    log(INFO, "node_ids=%s (waited %.2fs)", node_ids, time.time() - t0)

    global_arr = np.zeros(size, dtype=np.float32)
    history = []
    for rnd in range(1, num_rounds + 1):
        msgs = []
        for i, nid in enumerate(node_ids):
            content = RecordDict(
                {
                    "arrays": ArrayRecord([global_arr]),
                    # different content per node:
                    "config": ConfigRecord({"round": rnd, "secret": float(i * 10 + rnd)}),
                }
            )
            log(INFO, "round %d -> node %d: %d array bytes (ArrayRecord.count_bytes=%d)",
                rnd, nid, _msg_bytes(content), content["arrays"].count_bytes())
            msgs.append(Message(content=content, dst_node_id=nid,
                                message_type=MessageType.TRAIN, group_id=str(rnd)))
        t = time.time()
        poll = float(cfg["poll-interval"])
        if poll > 0:
            replies = send_and_receive_fast(grid, msgs, timeout, poll)
        else:
            replies = list(grid.send_and_receive(msgs, timeout=timeout))
        log(INFO, "round %d: %d/%d replies in %.2fs", rnd, len(replies), len(msgs), time.time() - t)
        # push sets msg.metadata.message_id; map replies back via reply_to_message_id.
        # (src_node_id of SuperLink-generated error replies, e.g. NODE_UNAVAILABLE, is 1, not the node!)
        dst_of = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs}
        ok = []
        for r in replies:
            if r.has_error():
                log(INFO, "round %d: node %d (src_node_id=%d) ERROR code=%s reason=%s", rnd,
                    dst_of.get(r.metadata.reply_to_message_id, -1), r.metadata.src_node_id,
                    r.error.code, r.error.reason[-300:])
                continue
            m = r.content["metrics"]
            log(INFO, "round %d: node %d metrics=%s info=%s reply-bytes=%d", rnd,
                r.metadata.src_node_id, dict(m), dict(r.content["info"]), _msg_bytes(r.content))
            ok.append(r.content["arrays"].to_numpy_ndarrays()[0])
        if not ok:
            raise RuntimeError(f"round {rnd}: no successful replies")
        global_arr = np.mean(ok, axis=0).astype(np.float32)
        history.append(global_arr.tolist())
        log(INFO, "round %d: global=%s", rnd, global_arr.tolist())

    # Send to a subset (first node only) with a query message
    sub = [Message(content=RecordDict(), dst_node_id=node_ids[0], message_type=MessageType.QUERY)]
    rep = list(grid.send_and_receive(sub, timeout=timeout))
    log(INFO, "subset query replies=%s", [dict(r.content["m"]) for r in rep if r.has_content()])

    # ServerApp context.state (not returned by run_simulation(); kept for illustration)
    context.state["result"] = ConfigRecord({"history": json.dumps(history)})
    if bool(cfg["server-fail"]):
        raise RuntimeError("TOYAPP deliberate ServerApp failure")
    log(INFO, "TOYAPP_RESULT %s elapsed=%.2fs", json.dumps(history), time.time() - t0)
