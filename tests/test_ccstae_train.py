"""CC-ST-AE training: streaming batches, checkpoints and resuming to the same state (issue 6)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import torch

from stemlib.ccstae import CCSTAEConfig, build_model
from stemlib.ccstae.data import PatternStream, Preprocess, data_fingerprint, sample_patterns
from stemlib.ccstae.train import Checkpoint, seeded, train
from stemlib.errors import InputError
from stemlib.masks import MaskSchedule
from stemlib.simulate import SimulationConfig, simulate

from .conftest import file_writer

CONFIG = CCSTAEConfig.preset("cpu", channels=4, epochs=3, batch_size=8, lr=1e-3)
SCHEDULE = MaskSchedule(kind="linear", start=(3, 15), end=(3, 13), epochs=3)


@pytest.fixture(scope="module")
def data() -> da.Array:
    return simulate(SimulationConfig(scan=(6, 5), pattern=32, grains=2, seed=4), chunks=(3, 5))[
        "data"
    ].data


def _run(
    data: da.Array,
    workdir,
    stop_after: int | None = None,
    schedule: MaskSchedule = SCHEDULE,
    slice_size: int | None = None,
    config: CCSTAEConfig = CONFIG,
) -> Checkpoint:
    seeded(config.seed)
    model = build_model(config, pattern_shape=(32, 32), center=(16.0, 16.0))
    record = Checkpoint.load(workdir) or Checkpoint(
        config=config.model_dump(mode="json"), seed=config.seed, data_fingerprint="scan-a", setup={}
    )
    stream = PatternStream(
        data, Preprocess("sqrt"), batch_size=config.batch_size, shuffle=True, seed=config.seed
    )

    def progress(metrics: dict) -> None:
        if stop_after is not None and metrics["epoch"] == stop_after:
            raise KeyboardInterrupt

    return train(
        model,
        stream,
        config=config,
        schedule=schedule,
        device=torch.device("cpu"),
        record=record,
        workdir=workdir,
        progress=progress,
        slice_size=slice_size,
    )


def test_stream_covers_every_pattern_once_and_shuffles_by_epoch(data):
    stream = PatternStream(data, Preprocess("linear"), batch_size=4, shuffle=True, seed=1)
    first = np.concatenate([b["index"].numpy() for b in stream])
    assert sorted(first.tolist()) == list(range(30))
    stream.epoch = 1
    second = np.concatenate([b["index"].numpy() for b in stream])
    assert sorted(second.tolist()) == list(range(30)) and not np.array_equal(first, second)
    stream.epoch = 0
    assert np.array_equal(first, np.concatenate([b["index"].numpy() for b in stream]))


def test_stream_batches_hold_the_right_patterns(data):
    raw = data.compute()
    checked = []
    for batch in PatternStream(data, Preprocess("linear", 2.0), batch_size=7):
        for pattern, index in zip(batch["pattern"], batch["index"].numpy(), strict=True):
            expected = raw[index // 5, index % 5] / raw[index // 5, index % 5].mean() / 2.0
            np.testing.assert_allclose(pattern[0].numpy(), expected, rtol=1e-5, atol=1e-6)
            checked.append(int(index))
    assert sorted(checked) == list(range(30))  # every pattern was compared, none twice


def test_sample_includes_requested_positions(data):
    patterns, index = sample_patterns(data, n=5, seed=0, include=np.array([29, 0]))
    assert {0, 29} <= set(index.tolist()) and len(patterns) == len(index)
    np.testing.assert_array_equal(patterns[index.tolist().index(29)], data[5, 4].compute())


def test_checkpoint_resumes_to_the_same_state(data, tmp_path):
    straight = _run(data, tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        _run(data, tmp_path / "resumed", stop_after=1)
    assert Checkpoint.load(tmp_path / "resumed").epoch == 1
    resumed = _run(data, tmp_path / "resumed")
    assert resumed.epoch == straight.epoch == 3
    for key, value in straight.model.items():
        torch.testing.assert_close(resumed.model[key], value, rtol=0, atol=0, msg=key)
    assert [h["loss"] for h in resumed.history] == pytest.approx(
        [h["loss"] for h in straight.history]
    )
    # the record is what the issue asks a checkpoint to hold
    saved = Checkpoint.load(tmp_path / "resumed")
    assert saved.config == CONFIG.model_dump(mode="json") and saved.seed == CONFIG.seed
    assert (
        saved.data_fingerprint == "scan-a" and "torch" in saved.versions and len(saved.history) == 3
    )


def test_a_batch_passed_in_slices_trains_as_the_whole_batch(data, tmp_path):
    """Batches of 8 passed 3 patterns at a time (what a device too small for 8 gets) take the
    same steps as batches passed whole: the same losses and, to float32 rounding, the same
    weights after three epochs."""
    whole = _run(data, tmp_path / "whole")
    sliced = _run(data, tmp_path / "sliced", slice_size=3)
    assert [h["loss"] for h in sliced.history] == pytest.approx(
        [h["loss"] for h in whole.history], rel=1e-5
    )
    for key, value in whole.model.items():
        torch.testing.assert_close(sliced.model[key], value, rtol=1e-4, atol=1e-5, msg=key)
    smaller = _run(data, tmp_path / "smaller", config=CONFIG.model_copy(update={"batch_size": 3}))
    assert not np.allclose(
        smaller.model["encoder.fc.weight"], whole.model["encoder.fc.weight"], rtol=1e-4, atol=1e-5
    )  # batches of 3 would be other steps


def test_each_epoch_trains_under_the_ring_the_schedule_gives_that_epoch(data, tmp_path):
    """Epoch e's loss masks with ``SCHEDULE.radii(e)``: three epochs under the narrowing schedule
    are, to the bit, one epoch under each of its rings held constant in turn (resumed from the
    checkpoint between them), and not three under its first ring."""
    straight = _run(data, tmp_path / "straight")
    for epoch in range(3):
        ring = SCHEDULE.radii(epoch)
        held = MaskSchedule(kind="constant", start=ring, end=ring, epochs=3)
        if epoch < 2:
            with pytest.raises(KeyboardInterrupt):
                _run(data, tmp_path / "held", stop_after=epoch + 1, schedule=held)
        else:
            in_turn = _run(data, tmp_path / "held", schedule=held)
    first = MaskSchedule(kind="constant", start=SCHEDULE.start, end=SCHEDULE.start, epochs=3)
    unchanged = _run(data, tmp_path / "first", schedule=first)
    assert [h["mask_radii"] for h in straight.history] == [[3.0, 15.0], [3.0, 14.0], [3.0, 13.0]]
    assert [h["mask_radii"] for h in in_turn.history] == [h["mask_radii"] for h in straight.history]
    for key, value in straight.model.items():
        torch.testing.assert_close(in_turn.model[key], value, rtol=0, atol=0, msg=key)
    losses = [h["loss"] for h in straight.history]
    assert [h["loss"] for h in in_turn.history] == pytest.approx(losses)
    assert [h["loss"] for h in unchanged.history][1:] != losses[1:]  # the ring does matter


def test_a_finished_checkpoint_is_not_trained_again(data, tmp_path):
    first = _run(data, tmp_path)
    again = _run(data, tmp_path, stop_after=1)  # would raise if an epoch ran
    assert again.history == first.history


def test_checkpoint_of_another_scan_or_recipe_is_refused(data, tmp_path):
    _run(data, tmp_path, stop_after=None)
    record = Checkpoint.load(tmp_path)
    with pytest.raises(InputError, match="trained on another scan; pass an empty workdir"):
        record.check_matches(config=CONFIG, data_fingerprint="scan-b", where=str(tmp_path))
    with pytest.raises(InputError, match=r"trained with other settings \(epochs, lr\)"):
        record.check_matches(
            config=CONFIG.model_copy(update={"epochs": 4, "lr": 0.1}),
            data_fingerprint="scan-a",
            where=str(tmp_path),
        )
    # inference-only settings may change
    record.check_matches(
        config=CONFIG.model_copy(update={"refine_steps": 0}),
        data_fingerprint="scan-a",
        where=str(tmp_path),
    )


def _record(epoch: int = 0) -> Checkpoint:
    return Checkpoint(
        config=CONFIG.model_dump(mode="json"),
        seed=CONFIG.seed,
        data_fingerprint="scan-a",
        setup={},
        epoch=epoch,
    )


def test_a_checkpoint_that_fails_to_save_leaves_the_last_one_whole(tmp_path, monkeypatch):
    """A save that fails part way (a full disk) left its ``checkpoint.tmp<pid>`` beside the
    checkpoint. Nothing is left: no temporary file, and no checkpoint (nor the folder the save
    created) where there was none; where there was one, it is the last epoch's, whole. The
    error is one sentence naming the checkpoint (PyTorch's own writer said "[enforce fail at
    inline_container.cc:672] . unexpected pos 131072 vs 130960")."""
    _record(epoch=1).save(tmp_path / "resumed")
    write_bytes = Path.write_bytes

    def half_then_full(path, data):
        write_bytes(path, bytes(data)[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", half_then_full)
    for workdir in (tmp_path / "fresh", tmp_path / "resumed"):
        with pytest.raises(InputError) as full:
            _record(epoch=2).save(workdir)
        assert str(full.value) == (
            f"{workdir / 'checkpoint.pt'}: its disk is full; free space on it, or write to "
            "another disk."
        )
    assert not (tmp_path / "fresh").exists()
    assert os.listdir(tmp_path / "resumed") == ["checkpoint.pt"]
    assert Checkpoint.load(tmp_path / "resumed").epoch == 1


def test_a_checkpoint_save_removes_what_killed_writers_left(tmp_path):
    """A training killed (out of memory, kill -9) while saving its checkpoint left the
    temporary file for ever. The next save removes it; a running writer's is kept, and so are
    one written on another machine (a shared disk) and one that an earlier stemflow named."""
    path = str(tmp_path / "checkpoint.pt")
    others = [".checkpoint.pt.partial-0123456789ab-1-0123abcd", "checkpoint.tmp4242"]
    for name in others:
        (tmp_path / name).write_bytes(b"")
    # the running writer first: the killed one's would otherwise be removed when it starts
    with file_writer(path, killed=False) as running, file_writer(path, killed=True) as killed:
        assert os.path.basename(killed).startswith(".checkpoint.pt.partial-")
        assert os.path.isfile(killed) and os.path.isfile(running)
        _record(epoch=1).save(tmp_path)
        left = sorted(os.listdir(tmp_path))
    assert left == sorted([*others, os.path.basename(running), "checkpoint.pt"])
    assert Checkpoint.load(tmp_path).epoch == 1


def test_unreadable_checkpoint(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="is not a readable CC-ST-AE checkpoint"):
        Checkpoint.load(tmp_path)


def test_fingerprint_is_the_stored_hash_or_a_content_hash(data):
    """A store's patterns as read are known by its hash; the same attributes on other values
    (here: a copy under another dask name) are not (:func:`stemlib.scan.stored_content`)."""
    import xarray as xr

    from stemlib.scan import stored_array_name

    name = stored_array_name("abc", data.chunks, data.dtype)
    as_read = data.map_blocks(lambda b: b, name=name, meta=data._meta)  # as open_scan names it
    attrs = {"content_sha256": "abc"}
    scan = xr.DataArray(as_read, dims=("rx", "ry", "qx", "qy"), attrs=attrs)
    assert data_fingerprint(scan) == "abc"
    copied = xr.DataArray(data, dims=("rx", "ry", "qx", "qy"), attrs=attrs)
    assert data_fingerprint(copied) == data_fingerprint(data) != "abc"
    other = data_fingerprint(data + 1)
    assert data_fingerprint(data) == data_fingerprint(data) != other


def test_loader_starts_no_more_workers_than_cores(data, monkeypatch):
    """The gpu preset's 4 DataLoader workers on a 2-core machine made PyTorch warn, twice per
    pass, that they may run slowly or freeze; the loader starts one per usable core."""
    import warnings

    import stemlib.ccstae.data as module

    monkeypatch.setattr(module, "usable_cores", lambda: 2)
    stream = PatternStream(data, Preprocess("linear"), batch_size=4, shuffle=True, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PyTorch's warning would fail the test
        monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
        batches = module.loader(stream, num_workers=4, device=torch.device("cpu"))
        assert batches.num_workers == 2
        seen = [b["index"].numpy() for b in batches]
    assert sorted(np.concatenate(seen).tolist()) == list(range(30))


def test_loader_workers_share_the_blocks(data):
    from stemlib.ccstae.data import loader

    stream = PatternStream(data, Preprocess("linear"), batch_size=4, shuffle=True, seed=2)
    seen = [b["index"].numpy() for b in loader(stream, num_workers=2, device=torch.device("cpu"))]
    assert sorted(np.concatenate(seen).tolist()) == list(range(30))
