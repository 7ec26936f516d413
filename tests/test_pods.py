"""TPU pods without TPUs: meshes on real slice topologies, compile-only answers, the roofline, the planner."""

import importlib.util
import os
import subprocess
import sys

import ml_collections
import pytest

from podformer import hardware
from podformer import mesh as mesh_lib
from podformer.core.errors import UserError
from tests.helpers import REPO, env

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="needs the [aot] extra: pip install -e '.[aot]'"
)


def mesh_cfg(data, fsdp, tensor):
    return ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor, "devices": 0})


def factorisations(n, tensors=(1, 2, 4, 8)):
    for t in tensors:
        f = 1
        while f * t <= n:
            if n % (f * t) == 0:
                yield n // (f * t), f, t
            f *= 2


def neighbours(a, b, shape) -> bool:
    """Chips one ICI hop apart on the torus (wrap-around links included)."""
    d = [min(abs(x - y), s - abs(x - y)) for x, y, s in zip(a, b, shape, strict=True)]
    return sorted(d) == [0] * (len(d) - 1) + [1]


@needs_libtpu
@pytest.mark.parametrize("spec", ["v5p-2048", "v4-1024"])
def test_every_factorisation_of_a_pod_slice_builds_a_mesh_with_tensor_groups_on_neighbouring_chips(spec):
    from podformer import aot

    _, devices = aot.topology_devices(spec)
    shape = mesh_lib.slice_shape(devices)
    count = 0
    for data, fsdp, tensor in factorisations(len(devices)):
        mesh = mesh_lib.make_mesh(mesh_cfg(data, fsdp, tensor), devices)
        assert dict(mesh.shape) == {"data": data, "fsdp": fsdp, "tensor": tensor}
        assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
        groups = mesh.devices.reshape(-1, tensor)
        for g in groups[:: max(1, len(groups) // 16)]:  # a sample of groups: each a line of neighbours
            assert all(neighbours(a.coords, b.coords, shape) for a, b in zip(g, g[1:])), [d.coords for d in g]
        count += 1
    assert count > 30


@needs_libtpu
def test_an_impossible_mesh_is_one_line_naming_the_slice_and_what_works():
    from podformer import aot

    _, devices = aot.topology_devices("v5p-2048")
    with pytest.raises(UserError) as e:
        mesh_lib.make_mesh(mesh_cfg(-1, 1, 3), devices)
    msg = str(e.value)
    assert "\n" not in msg and "8x8x16 slice" in msg and "1024" in msg and "1, 2, 4, 8" in msg, msg
    with pytest.raises(UserError) as e:
        mesh_lib.make_mesh(mesh_cfg(2, 2, 2), devices)
    assert "\n" not in str(e.value) and "8x8x16 slice" in str(e.value)
