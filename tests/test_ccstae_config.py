"""CC-ST-AE configuration: presets, files and the errors a user can act on (issue 6)."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import torch
import xarray as xr

from stemlib.ccstae import CCSTAEConfig, ccstae_strain
from stemlib.ccstae.config import check_config, resolve_device
from stemlib.errors import InputError
from stemlib.masks import MaskSchedule


def _scan(shape=(2, 2, 32, 32)) -> xr.DataArray:
    return xr.DataArray(
        da.zeros(shape, dtype=np.float32, chunks=(1, 1, -1, -1)), dims=("rx", "ry", "qx", "qy")
    )


def test_presets_differ_and_round_trip():
    cpu, gpu = CCSTAEConfig.preset("cpu"), CCSTAEConfig.preset("gpu")
    assert cpu.channels < gpu.channels and gpu.epochs >= cpu.epochs
    assert CCSTAEConfig.model_validate_json(gpu.model_dump_json()) == gpu
    assert CCSTAEConfig.preset("cpu", epochs=3).epochs == 3


def test_unknown_preset():
    with pytest.raises(InputError, match="preset 'tpu' does not exist; use one of"):
        CCSTAEConfig.preset("tpu")  # type: ignore[arg-type]


def test_mask_larger_than_the_pattern():
    config = CCSTAEConfig.preset("cpu", mask=MaskSchedule(start=(4, 40), end=(4, 30), epochs=2))
    with pytest.raises(
        InputError, match=r"outer radius 40 px is larger than the 64x64 px pattern allows \(32 px\)"
    ):
        check_config(config, pattern_shape=(64, 64))
    with pytest.raises(InputError, match="outer radius 40 px is larger"):
        ccstae_strain(_scan((2, 2, 64, 64)), config=config, device="cpu", progress=False)


@pytest.mark.parametrize("num_bases", [0, -1])
def test_num_bases_below_one(num_bases):
    with pytest.raises(InputError, match=f"num_bases={num_bases} must be 1 or more"):
        ccstae_strain(
            _scan(),
            config=CCSTAEConfig.preset("cpu", num_bases=num_bases),
            device="cpu",
            progress=False,
        )


def test_unknown_device():
    with pytest.raises(InputError, match="device='tpu' is not known; use auto, cpu or cuda"):
        ccstae_strain(_scan(), device="tpu", progress=False)  # type: ignore[arg-type]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_cuda():
    with pytest.raises(InputError, match="no CUDA GPU; use --device auto or cpu"):
        resolve_device("cuda")


def test_auto_device_is_cuda_only_when_present():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_the_automatic_preset_follows_the_device(monkeypatch):
    """``auto`` picks the gpu preset wherever CUDA is visible: in the library and in the flows'
    parameters (a GPU machine is stood in for by what torch reports)."""
    from flows.process_scan import resolved_parameters

    assert CCSTAEConfig.for_device("cpu") == CCSTAEConfig.preset("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert CCSTAEConfig.for_device("auto") == CCSTAEConfig.preset("gpu")
    assert resolved_parameters(device="auto")["ccstae"] == CCSTAEConfig.preset("gpu")
    assert resolved_parameters(device="cpu")["ccstae"] == CCSTAEConfig.preset("cpu")
    assert resolved_parameters(ccstae_preset="cpu")["ccstae"] == CCSTAEConfig.preset("cpu")


def test_unknown_symmetry():
    with pytest.raises(InputError, match="symmetry=3 is not known; use auto, 2, 4 or 6"):
        ccstae_strain(_scan(), symmetry=3, device="cpu", progress=False)  # type: ignore[arg-type]


def test_config_from_yaml_starts_from_a_preset(tmp_path):
    path = tmp_path / "ccstae.yaml"
    path.write_text(
        "preset: cpu\nepochs: 3\nmask:\n  start: [4, 28]\n  end: [4, 24]\n  epochs: 3\n"
    )
    config = CCSTAEConfig.from_file(path)
    assert config.epochs == 3 and config.channels == CCSTAEConfig.preset("cpu").channels
    assert config.mask is not None and config.mask.radii(2) == (4.0, 24.0)


def test_a_config_file_without_a_preset_changes_the_devices_preset(tmp_path):
    """A file that only says ``epochs: 3`` keeps the small model on a CPU (it used to start
    from the field defaults: the 128-channel model, about 100x slower there)."""
    path = tmp_path / "ccstae.yaml"
    path.write_text("epochs: 3\n")
    assert CCSTAEConfig.from_file(path, device="cpu") == CCSTAEConfig.preset("cpu", epochs=3)
    assert CCSTAEConfig.from_file(path, preset="gpu") == CCSTAEConfig.preset("gpu", epochs=3)
    path.write_text("preset: cpu\nepochs: 3\n")  # the file's own preset wins
    assert CCSTAEConfig.from_file(path, preset="gpu") == CCSTAEConfig.preset("cpu", epochs=3)


def test_config_file_errors(tmp_path):
    with pytest.raises(InputError, match="config file .*missing.yaml does not exist"):
        CCSTAEConfig.from_file(tmp_path / "missing.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(InputError, match="does not hold a mapping of CCSTAEConfig fields"):
        CCSTAEConfig.from_file(path)
