"""Two real processes (jax.distributed on CPU) read disjoint rows that together make each global batch."""

import json
import socket
import subprocess
import sys

import jax
import numpy as np

from podformer.configs.common import RULES
from podformer.data.loader import Loader
from tests.helpers import REPO, env

WORKER = r"""
import json, sys
import jax
import numpy as np
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from podformer.configs.common import RULES
from podformer.data.loader import Loader

class Rows:
    def __len__(self):
        return 48
    def __getitem__(self, i):
        return {"index": np.int64(i), "inputs": np.full((4,), i, np.int32)}
    def transform(self, example, rng):  # an objective's randomness: must agree across hosts
        return {"inputs": example["inputs"], "noise": rng.integers(0, 1000, (4,)).astype(np.int32)}

mesh = jax.make_mesh((4, 1, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
loader = Loader(Rows(), global_batch=8, mesh=mesh, rules=RULES, seed=3)
out = {"rows": [loader.lo, loader.hi], "batches": []}
for step in range(8):  # past the end of the first epoch
    b = loader.host_batch(step)
    out["batches"].append({"ids": b["inputs"][:, 0].tolist(), "noise": b["noise"].tolist()})
print("RESULT" + json.dumps(out))
"""


class _Rows:
    def __len__(self):
        return 48

    def __getitem__(self, i):
        return {"index": np.int64(i), "inputs": np.full((4,), i, np.int32)}

    def transform(self, example, rng):
        return {"inputs": example["inputs"], "noise": rng.integers(0, 1000, (4,)).astype(np.int32)}


def test_two_processes_read_disjoint_rows_covering_the_global_batch(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), f"127.0.0.1:{port}", str(i)],
            cwd=REPO,
            env=env(devices=2, JAX_PLATFORMS="cpu"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT"))[6:]))
    assert results[0]["rows"] == [0, 4] and results[1]["rows"] == [4, 8]
    one = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3,
                        devices=jax.devices()[:1])  # fmt: skip
    reference = Loader(_Rows(), global_batch=8, mesh=one, rules=RULES, seed=3)
    seen = []
    for step in range(8):
        a, b = results[0]["batches"][step], results[1]["batches"][step]
        assert not set(a["ids"]) & set(b["ids"])
        full = reference.host_batch(step)
        np.testing.assert_array_equal(a["ids"] + b["ids"], full["inputs"][:, 0])
        np.testing.assert_array_equal(a["noise"] + b["noise"], full["noise"])  # same masks on every topology
        seen += a["ids"] + b["ids"]
    assert sorted(seen[:48]) == list(range(48))  # the first epoch covers every row once
