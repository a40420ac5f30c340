"""CC-ST-AE steps sized to the device's memory (issue 6): the estimates of what one pattern
holds against measured peaks, the host's memory within a container's limit, and the batch that
fits. A run whose steps are cut, with the same maps, is in tests/test_ccstae_pipeline.py; the
training steps passed in slices, in tests/test_ccstae_train.py."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import partial

import psutil
import pytest
import torch

from stemlib.ccstae import CCSTAEConfig, build_model
from stemlib.ccstae.memory import (
    ENCODER_MAPS,
    TEMPLATE_VALUES_PER_PIXEL,
    batch_that_fits,
    host_available,
    pattern_bytes,
    search_block,
    search_bytes,
    template_block,
)

#: Peak memory per pattern of the gpu preset's encoder (inference), of its training step and of
#: the rotation search (its ring and angles: ``SEARCH``), on patterns of 64 px, measured in a
#: fresh interpreter by the kernel's high-water mark of its memory (VmHWM, reset to the present
#: size before each step by writing 5 to clear_refs; getrusage's ru_maxrss would be inherited
#: from the test process that forks the child).
SEARCH = {"radius": 10.0, "radii": (5.0, 28.0), "n_angles": 720}
PEAKS = (
    f"SEARCH = {SEARCH!r}\n"
    + """
import json, torch
from stemlib.ccstae import CCSTAEConfig, build_model
from stemlib.ccstae.loss import cycle_loss
from stemlib.ccstae.rotation import centred_features

def growth(step):
    step(1)
    open("/proc/self/clear_refs", "w").write("5")
    before = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])
    step(16)
    after = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
    return (after - before) * 1024 / 16

torch.set_num_threads(1)
config = CCSTAEConfig.preset("gpu")
model = build_model(config, pattern_shape=(64, 64), center=(32.0, 32.0))
x, mask = torch.rand(16, 1, 64, 64), torch.ones(64, 64)

def infer(n):
    with torch.no_grad():
        model.encode(x[:n])

def train(n):
    cycle_loss(model(x[:n]), x[:n], mask, config, center=model.center).total.backward()

def search(n):
    centred_features(x[:n], center=(32.0, 32.0), block=n, **SEARCH)

print(json.dumps({"search": growth(search), "encoder": growth(infer), "training": growth(train)}))
"""
)


def test_the_measured_peaks_are_within_the_estimates():
    out = subprocess.run([sys.executable, "-c", PEAKS], capture_output=True, text=True, check=True)
    measured = json.loads(out.stdout)
    model = build_model(CCSTAEConfig.preset("gpu"), pattern_shape=(64, 64), center=(32.0, 32.0))
    channels, h, w = model.encoder.feature_map
    maps = measured["encoder"] / (4 * channels * h * w)  # float32 copies of the largest map
    assert 2.5 < maps < ENCODER_MAPS, maps  # measured 3.9-4.3 (memory.py)
    training = measured["training"] / pattern_bytes(model, (64, 64), training=True)
    assert 0.5 < training < 1.0, measured
    search = measured["search"] / search_bytes((64, 64), radii=SEARCH["radii"], n_angles=720)
    assert 0.3 < search < 1.0, measured  # measured 0.5-0.6 of the estimate (memory.py)


def test_the_hosts_memory_is_capped_by_its_cgroup(tmp_path):
    (tmp_path / "memory.max").write_text("1073741824\n")
    (tmp_path / "memory.current").write_text("268435456\n")
    assert host_available(tmp_path) == 805_306_368  # this machine has more than that free
    (tmp_path / "memory.stat").write_text("anon 134217728\ninactive_file 134217728\n")
    assert host_available(tmp_path) == 939_524_096  # the inactive cache is reclaimed first
    (tmp_path / "memory.max").write_text("max\n")
    unlimited = host_available(tmp_path)
    assert unlimited > 939_524_096
    assert abs(unlimited - psutil.virtual_memory().available) < 2**30
    assert host_available(tmp_path / "absent") > 939_524_096  # no cgroup: psutil's figure
    (tmp_path / "memory.current").write_text("2147483648\n")  # above the limit: nothing left
    (tmp_path / "memory.max").write_text("1073741824\n")
    assert host_available(tmp_path) == 0


def test_the_hosts_memory_is_capped_by_its_cgroup_v1(tmp_path):
    v1 = tmp_path / "memory"
    v1.mkdir()
    (v1 / "memory.limit_in_bytes").write_text("1073741824\n")
    (v1 / "memory.usage_in_bytes").write_text("536870912\n")
    (v1 / "memory.stat").write_text(
        "cache 402653184\ninactive_file 1\ntotal_inactive_file 268435456\n"
    )
    assert host_available(tmp_path) == 805_306_368
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert abs(host_available(tmp_path) - psutil.virtual_memory().available) < 2**30


@pytest.mark.parametrize(
    ("device", "free", "expected"),
    [("cpu", 4 * 2**30, 23), ("cpu", 2**20, 1), ("cuda", 4 * 2**30, 47), ("cpu", 2**40, 2048)],
)
def test_the_inference_batch_fits_its_share_of_free_memory(device, free, expected):
    model = build_model(CCSTAEConfig.preset("gpu"), pattern_shape=(128, 128), center=(64, 64))
    batch, line = batch_that_fits(
        model, (128, 128), requested=2048, device=torch.device(device), free=free
    )
    assert batch == expected  # 45.1 MB each: a quarter of a host's free memory, half a GPU's
    if batch == 2048:
        assert line is None
    else:
        share = "a quarter" if device == "cpu" else "half"
        assert line.startswith(f"ccstae: inference in steps of {batch} patterns: infer_batch_size ")
        assert f"{share} of the {free / 1e9:.2g} GB free on" in line


def test_a_training_step_is_sliced_to_its_share_of_free_memory():
    model = build_model(CCSTAEConfig.preset("gpu"), pattern_shape=(128, 128), center=(64, 64))
    cpu = torch.device("cpu")
    fits = partial(batch_that_fits, model, (128, 128), requested=256, device=cpu, training=True)
    assert fits(free=2**40) == (256, None)
    batch, line = fits(free=4 * 2**30)
    assert batch == 10  # 103.8 MB each, in a quarter of 4.3 GB
    assert line == (
        "ccstae: training steps of 256 patterns in slices of 10, their gradients summed: "
        "batch_size 256 would hold about 27 GB, and a quarter of the 4.3 GB free on the cpu is "
        "1.1 GB"
    )


def test_the_rotation_search_takes_blocks_that_fit():
    blocks = partial(search_block, (256, 256), radii=(20.0, 112.0), n_angles=720, requested=2048)
    assert blocks(device=torch.device("cuda"), free=80 * 2**30) == (2048, None)  # 11 GB of 43
    block, line = blocks(device=torch.device("cpu"), free=8 * 2**30)
    assert block == 404  # 5.3 MB each, in a quarter of 8.6 GB
    assert line == (
        "ccstae: rotation search in blocks of 404 patterns: blocks of 2,048 would hold about "
        "11 GB, and a quarter of the 8.6 GB free on the cpu is 2.1 GB"
    )


def test_the_starting_bases_take_blocks_that_fit():
    blocks = partial(template_block, (512, 512), requested=256)
    assert blocks(device=torch.device("cuda"), free=80 * 2**30) == (256, None)  # 17 GB of 43
    block, line = blocks(device=torch.device("cpu"), free=2**30)
    assert block == 4  # 67 MB each, in a quarter of 1.1 GB
    assert line == (
        "ccstae: starting bases in blocks of 4 patterns: blocks of 256 would hold about 17 GB, "
        "and a quarter of the 1.1 GB free on the cpu is 0.27 GB"
    )


#: The starting bases' registration and solve (learn_bases) on 64 simulated patterns of 128 px
#: at once, after a first call on 8 (the fixed costs), in a fresh interpreter as ``PEAKS``.
BASES_PEAK = """
import json, numpy as np, torch
from stemlib.ccstae.template import learn_bases
from stemlib.masks import ring_mask
from stemlib.simulate import SimulationConfig, simulate

torch.set_num_threads(1)
sim = simulate(SimulationConfig(scan=(8, 8), pattern=128, grains=3, seed=1))
x = torch.from_numpy(np.sqrt(np.asarray(sim["data"].values, np.float32).reshape(-1, 1, 128, 128)))
ring = torch.from_numpy(ring_mask((128, 128), inner=10.0, outer=56.0)).float()

def bases(n):
    learn_bases(x[:n], torch.zeros(n), ring, num_bases=1, center=(64.0, 64.0), rounds=1,
                steps=3, batch_size=n, background=True, disk_radius=6.0, inner=10.0)

def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024

bases(8)
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
bases(64)
print(json.dumps((status("VmHWM") - before) / 64))
"""


def test_the_measured_peak_of_the_starting_bases_is_within_the_estimate():
    out = subprocess.run(
        [sys.executable, "-c", BASES_PEAK], capture_output=True, text=True, check=True
    )
    measured = json.loads(out.stdout) / (4 * TEMPLATE_VALUES_PER_PIXEL * 128 * 128)
    assert 0.4 < measured < 1.0, measured  # 0.59 (38 values per pixel; memory.py: 42-60)
