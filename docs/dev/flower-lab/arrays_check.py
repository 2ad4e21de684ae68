"""ArrayRecord <-> torch/numpy conversions, bf16 behaviour, exact byte sizes."""
import io
import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

sd = {"w": torch.randn(3, 4), "b": torch.zeros(4, dtype=torch.float16), "i": torch.arange(5)}
rec = ArrayRecord(sd)                         # auto-detected torch state_dict
print("keys", list(rec.keys()), [ (k, a.dtype, a.shape, a.stype, len(a.data)) for k, a in rec.items()])
back = rec.to_torch_state_dict()
print("roundtrip torch equal:", all(torch.equal(sd[k], back[k]) for k in sd), {k: v.dtype for k, v in back.items()})
print("count_bytes", rec.count_bytes(), "sum len(data)", sum(len(a.data) for a in rec.values()),
      "raw tensor bytes", sum(t.numel() * t.element_size() for t in sd.values()))

# numpy list -> keys "0","1",...
nrec = ArrayRecord([np.ones(10, np.float32), np.zeros((2, 2), np.int64)])
print("numpy list keys", list(nrec.keys()), [len(a.data) for a in nrec.values()], "npy header overhead", len(nrec["0"].data) - 40)

# bf16
t = torch.randn(4, 4, dtype=torch.bfloat16)
for label, fn in [("ArrayRecord({'x': bf16})", lambda: ArrayRecord({"x": t})),
                  ("Array(bf16)", lambda: Array(t))]:
    try:
        fn(); print(label, "OK")
    except Exception as e:
        print(label, "FAILS:", type(e).__name__, str(e)[:120])

# workaround A: raw bytes Array with custom stype (no numpy), reconstruct manually
raw = Array(dtype="bfloat16", shape=tuple(t.shape), stype="torch.raw", data=t.contiguous().view(torch.uint16).numpy().tobytes())
r2 = ArrayRecord({"x": raw})
# Message() outside a running ServerApp/ClientApp needs TaskIdentity (unit tests!)
from flwr.supercore.task_identity import TaskIdentity
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
m = Message(RecordDict({"a": r2}), dst_node_id=1, message_type="train")
# simulate the wire: deflate every nested object, inflate from bytes only
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
contents = {oid: o.deflate() for oid, o in get_all_nested_objects(m).items()}
print("wire objects", len(contents), "total deflated bytes", sum(map(len, contents.values())))
m2 = inflate_object_from_contents(m.object_id, contents)
a = m2.content["a"]["x"]
print("after wire: dtype", a.dtype, "stype", a.stype, "shape", a.shape)
t2 = torch.frombuffer(bytearray(a.data), dtype=torch.uint16).view(torch.bfloat16).reshape(a.shape)
print("bf16 raw workaround equal:", torch.equal(t, t2), "bytes", len(a.data), "(=numel*2:", t.numel()*2, ")")
try:
    a.numpy()
except Exception as e:
    print("raw Array.numpy() ->", type(e).__name__, e)
# workaround B: view as int16 / uint16 numpy (keeps dtype info out-of-band)
r3 = ArrayRecord({"x": t.view(torch.int16)})
t3 = r3.to_torch_state_dict()["x"].view(torch.bfloat16)
print("bf16 via int16 view equal:", torch.equal(t, t3), r3["x"].dtype)

# exact message sizes
rd = RecordDict({"arrays": rec, "cfg": ConfigRecord({"lr": 0.1, "name": "x"}), "m": MetricRecord({"acc": 0.5})})
print("sum(rec.count_bytes())", sum(r.count_bytes() for r in rd.values()), "array payload", sum(len(a.data) for r in rd.array_records.values() for a in r.values()))
