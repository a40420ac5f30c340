"""CC-ST-AE inference sized to the device's memory (issue 6): the estimate of what one pattern
holds against a measured peak, the host's memory within a container's limit, and a run whose
inference is cut into smaller steps giving the same maps (tests/test_ccstae_pipeline.py holds
that scan)."""

from __future__ import annotations

import json
import subprocess
import sys

import psutil
import pytest
import torch

from stemlib.ccstae import CCSTAEConfig, build_model
from stemlib.ccstae.memory import ENCODER_MAPS, host_available, inference_batch

#: Peak RSS growth per pattern of the gpu preset's encoder on patterns of 64 px, measured in a
#: fresh interpreter by the kernel's high-water mark of its memory (VmHWM: reset by exec, unlike
#: getrusage's ru_maxrss, which a child inherits from the test process it was forked from).
ENCODER_PEAK = """
import json, torch
from stemlib.ccstae import CCSTAEConfig, build_model

def peak():
    status = open("/proc/self/status").read().split("VmHWM:")[1]
    return int(status.split()[0]) * 1024

torch.set_num_threads(1)
model = build_model(CCSTAEConfig.preset("gpu"), pattern_shape=(64, 64), center=(32.0, 32.0))
x = torch.rand(64, 1, 64, 64)
with torch.no_grad():
    model.encode(x[:1])
    before = peak()
    model.encode(x)
print(json.dumps({"per_pattern": (peak() - before) / 64, "map": model.encoder.feature_map}))
"""


def test_the_encoders_measured_peak_is_within_the_estimate():
    out = subprocess.run(
        [sys.executable, "-c", ENCODER_PEAK], capture_output=True, text=True, check=True
    )
    measured = json.loads(out.stdout)
    channels, h, w = measured["map"]
    maps = measured["per_pattern"] / (4 * channels * h * w)  # float32 copies of the largest map
    assert 2.5 < maps < ENCODER_MAPS, maps  # measured 3.9-4.3 (memory.py)


def test_the_hosts_memory_is_capped_by_its_cgroup(tmp_path):
    (tmp_path / "memory.max").write_text("1073741824\n")
    (tmp_path / "memory.current").write_text("268435456\n")
    assert host_available(tmp_path) == 805_306_368  # this machine has more than that free
    (tmp_path / "memory.max").write_text("max\n")
    unlimited = host_available(tmp_path)
    assert unlimited > 805_306_368
    assert abs(unlimited - psutil.virtual_memory().available) < 2**30
    assert host_available(tmp_path / "absent") > 805_306_368  # no cgroup v2: psutil's figure
    (tmp_path / "memory.current").write_text("2147483648\n")  # above the limit: nothing left
    (tmp_path / "memory.max").write_text("1073741824\n")
    assert host_available(tmp_path) == 0


@pytest.mark.parametrize(
    ("device", "free", "expected"),
    [("cpu", 4 * 2**30, 26), ("cpu", 2**20, 1), ("cuda", 4 * 2**30, 53), ("cpu", 2**40, 2048)],
)
def test_the_inference_batch_fits_its_share_of_free_memory(device, free, expected):
    model = build_model(CCSTAEConfig.preset("gpu"), pattern_shape=(128, 128), center=(64, 64))
    batch, line = inference_batch(
        model, (128, 128), requested=2048, device=torch.device(device), free=free
    )
    assert batch == expected  # 39.8 MB each: a quarter of a host's free memory, half a GPU's
    if batch == 2048:
        assert line is None
    else:
        share = "a quarter" if device == "cpu" else "half"
        assert line.startswith(f"ccstae: inference in steps of {batch} patterns: infer_batch_size ")
        assert f"{share} of the {free / 1e9:.0f} GB free on" in line
