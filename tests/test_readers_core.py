"""Core readers (npy, raw binary, HDF5 layouts): bytes round-trip, calibration, laziness, errors."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from stemlib.errors import InputError
from stemlib.io.readers import ReadOptions, open_source


def scan(shape=(3, 4, 16, 12), dtype="uint16", seed=0) -> np.ndarray:
    """Distinct values per position, so that an axis swap changes the bytes."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 1000, shape).astype(dtype)
    data[..., 0, 0] = np.arange(shape[0] * shape[1]).reshape(shape[:2])
    return data


def test_npy_round_trip_is_lazy(tmp_path, dask_computes):
    data = scan()
    np.save(tmp_path / "s.npy", data)
    with dask_computes as counter:
        src = open_source(str(tmp_path / "s.npy"))
    assert counter.count == 0
    assert src.reader == "npy"
    assert src.data.shape == data.shape and src.data.dtype == data.dtype
    np.testing.assert_array_equal(src.data.compute(), data)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32", "float32", ">u2", "int16"])
def test_npy_dtypes_round_trip(tmp_path, dtype):
    data = scan(dtype=dtype)
    np.save(tmp_path / "s.npy", data)
    out = open_source(str(tmp_path / "s.npy"), options=ReadOptions(chunks=(2, 3))).data
    assert out.chunks[:2] == ((2, 1), (3, 1))
    np.testing.assert_array_equal(out.compute(), data)
    assert out.dtype == np.dtype(dtype)


def test_npy_in_fortran_order_is_refused(tmp_path):
    """A Fortran-order .npy (``np.save`` of a transposed array) holds its bytes with rx running
    fastest: read by byte ranges as C order, every pattern would be a scramble of many."""
    np.save(tmp_path / "f.npy", np.asfortranarray(scan()))
    with pytest.raises(
        InputError,
        match=r"f\.npy is stored in Fortran order; re-save it with "
        r"np\.save\(path, np\.ascontiguousarray\(a\)\)\.$",
    ):
        open_source(str(tmp_path / "f.npy"))


def test_npy_frames_with_scan_shape(tmp_path):
    data = scan()
    np.save(tmp_path / "f.npy", data.reshape(12, 16, 12))
    out = open_source(
        str(tmp_path / "f.npy"), options=ReadOptions(scan_shape=(3, 4), chunks=(2, 3))
    )
    np.testing.assert_array_equal(out.data.compute(), data)


def test_raw_with_header_and_frame_footer(tmp_path):
    data = scan(dtype="<u2")
    header, fhead, ffoot = 64, 8, 1024
    with open(tmp_path / "s.raw", "wb") as f:
        f.write(b"H" * header)
        for frame in data.reshape(-1, 16, 12):
            f.write(b"h" * fhead + frame.tobytes() + b"f" * ffoot)
    options = ReadOptions(
        dtype="<u2",
        frame_shape=(16, 12),
        scan_shape=(3, 4),
        header_bytes=header,
        frame_header_bytes=fhead,
        frame_footer_bytes=ffoot,
        chunks=(1, 3),
    )
    out = open_source(str(tmp_path / "s.raw"), options=options)
    assert out.reader == "raw"
    np.testing.assert_array_equal(out.data.compute(), data)


def test_raw_needs_its_layout(tmp_path):
    (tmp_path / "s.raw").write_bytes(b"\0" * 1000)
    with pytest.raises(
        InputError, match=r"s\.raw: a raw binary file needs its layout; pass --dtype"
    ):
        open_source(str(tmp_path / "s.raw"))


@pytest.mark.parametrize(("dtype", "named"), [("c8", "complex64"), ("O", "object"), ("U4", "<U4")])
def test_raw_of_values_that_are_not_counts_is_refused_by_its_dtype(tmp_path, dtype, named):
    """The sentence named the destination store ("the scan for X.zarr holds object values")
    rather than the --dtype that chose them."""
    (tmp_path / "s.raw").write_bytes(b"\0" * 2048)
    layout = ReadOptions(dtype=dtype, frame_shape=(4, 4), scan_shape=(4, 4))
    with pytest.raises(InputError) as refused:
        open_source(str(tmp_path / "s.raw"), options=layout)
    assert str(refused.value) == (
        f"--dtype '{dtype}' is {named}, not integer or float counts; use e.g. uint16 or <f4."
    )


def test_raw_truncated(tmp_path):
    (tmp_path / "s.raw").write_bytes(b"\0" * (3 * 4 * 16 * 12 * 2 - 10))
    options = ReadOptions(dtype="uint16", frame_shape=(16, 12), scan_shape=(3, 4))
    with pytest.raises(
        InputError, match=r"s\.raw is truncated: it has 4598 bytes but its shape needs 4608"
    ):
        open_source(str(tmp_path / "s.raw"), options=options)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (12 * 6, r"has 72 bytes more than 12 frames of this layout \(6 per frame: a frame header"),
        (5, r"has 5 bytes more than 12 frames of this layout; check --header-bytes"),
    ],
)
def test_raw_with_bytes_its_layout_does_not_explain(tmp_path, extra, message):
    """A header or footer left out of the options would misalign every frame."""
    (tmp_path / "s.raw").write_bytes(b"\0" * (3 * 4 * 16 * 12 * 2 + extra))
    options = ReadOptions(dtype="uint16", frame_shape=(16, 12), scan_shape=(3, 4))
    with pytest.raises(InputError, match=message):
        open_source(str(tmp_path / "s.raw"), options=options)


def test_hdf5_single_4d_dataset_found(tmp_path):
    data = scan()
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f["meta/values"] = np.arange(5)
        f.create_dataset("group/cube", data=data, chunks=(1, 1, 16, 12), compression="gzip")
    out = open_source(str(tmp_path / "s.h5"))
    assert out.details["dataset"] == "/group/cube"
    np.testing.assert_array_equal(out.data.compute(), data)


def test_hdf5_several_candidates_are_listed(tmp_path):
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f["a"] = scan()
        f["b"] = scan(seed=1)
    with pytest.raises(
        InputError,
        match=(
            r"several candidate scans \(/a \(3, 4, 16, 12\), /b \(3, 4, 16, 12\)\); "
            r"pass --dataset"
        ),
    ):
        open_source(str(tmp_path / "s.h5"))
    out = open_source(str(tmp_path / "s.h5"), options=ReadOptions(dataset="b"))
    np.testing.assert_array_equal(out.data.compute(), scan(seed=1))


def test_hdf5_missing_dataset_lists_names(tmp_path):
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f["a"] = scan()
    with pytest.raises(InputError, match=r"has no dataset /nope; pass --dataset with one of: /a\."):
        open_source(str(tmp_path / "s.h5"), options=ReadOptions(dataset="/nope"))


def test_hdf5_frames_with_scan_shape(tmp_path):
    data = scan()
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f["frames"] = data.reshape(12, 16, 12)
    out = open_source(str(tmp_path / "s.h5"), options=ReadOptions(scan_shape=(3, 4), chunks=(2, 3)))
    np.testing.assert_array_equal(out.data.compute(), data)


def test_paper_output4d_layout_is_transposed(tmp_path):
    """The CC-ST-AE paper's MATLAB v7.3 files hold output4D as (ry, rx, qy, qx) in h5py."""
    data = scan(shape=(3, 4, 16, 12))
    with h5py.File(tmp_path / "paper.mat", "w") as f:
        f["output4D"] = np.transpose(data, (1, 0, 3, 2))
    out = open_source(str(tmp_path / "paper.mat"), options=ReadOptions(chunks=(2, 3)))
    assert out.details["layout"] == "output4D"
    assert out.data.shape == (3, 4, 16, 12)
    np.testing.assert_array_equal(out.data.compute(), data)


def test_py4dstem_emd1_with_calibration(tmp_path):
    import py4DSTEM

    data = scan(shape=(3, 4, 16, 16))
    cube = py4DSTEM.DataCube(data=data)
    cube.calibration.set_R_pixel_size(2.5)
    cube.calibration.set_R_pixel_units("A")
    cube.calibration.set_Q_pixel_size(0.02)
    cube.calibration.set_Q_pixel_units("A^-1")
    py4DSTEM.save(str(tmp_path / "cube.h5"), cube, mode="o")
    out = open_source(str(tmp_path / "cube.h5"))
    assert out.reader == "hdf5:emd1"
    np.testing.assert_array_equal(out.data.compute(), data)
    assert out.calibration.probe_step_nm == pytest.approx(0.25)
    assert out.calibration.q_pixel_size == pytest.approx(0.02)
    assert out.calibration.q_pixel_units == "1/A"


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"nope\.npy does not exist; check the path\."):
        open_source(str(tmp_path / "nope.npy"))


def test_unknown_format_lists_supported(tmp_path):
    (tmp_path / "scan.xyz").write_bytes(b"12345")
    with pytest.raises(
        InputError, match=r"scan\.xyz: unknown format \.xyz; pass --format with one of: .*npy.*hdf5"
    ):
        open_source(str(tmp_path / "scan.xyz"))


def test_file_claiming_npy_is_not(tmp_path):
    (tmp_path / "fake.npy").write_text("not numpy at all")
    with pytest.raises(InputError, match=r"fake\.npy is not a NumPy \.npy file .*pass --format"):
        open_source(str(tmp_path / "fake.npy"))


def test_file_claiming_hdf5_is_not(tmp_path):
    (tmp_path / "fake.h5").write_bytes(b"\x00" * 256)
    with pytest.raises(InputError, match=r"fake\.h5 is not a valid .*hdf5 file .*pass --format"):
        open_source(str(tmp_path / "fake.h5"))


def test_truncated_hdf5(tmp_path):
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f.create_dataset("cube", data=scan(shape=(8, 8, 32, 32)))
    raw = (tmp_path / "s.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(
        InputError,
        match=r"cut\.h5 is not a readable HDF5 file \(it is truncated or another format\)",
    ):
        open_source(str(tmp_path / "cut.h5")).data.compute()


def test_truncated_npy(tmp_path):
    np.save(tmp_path / "s.npy", scan())
    raw = (tmp_path / "s.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(raw[:-100])
    with pytest.raises(
        InputError, match=r"cut\.npy is truncated: it has \d+ bytes but its shape needs \d+"
    ):
        open_source(str(tmp_path / "cut.npy"))


@pytest.mark.parametrize(
    ("shape", "options", "message"),
    [
        (
            (12, 16, 12),
            ReadOptions(),
            (
                r"has shape \(12, 16, 12\) \(12 frames\); expected 4 dims \(rx, ry, qx, qy\): "
                r"pass --scan-shape RX,RY"
            ),
        ),
        ((16, 12), ReadOptions(), r"has shape \(16, 12\) \(one pattern\); expected 4 dims"),
        (
            (12, 16, 12),
            ReadOptions(scan_shape=(5, 3)),
            r"holds 12 frames of 16x12, which --scan-shape 5,3 \(15 positions\) does not fit",
        ),
        (
            (2, 3, 4, 16, 12),
            ReadOptions(),
            r"has shape \(2, 3, 4, 16, 12\) with 5 dims; expected 4 dims",
        ),
        ((0, 4, 16, 12), ReadOptions(), r"holds an empty scan of shape \(0, 4, 16, 12\)"),
    ],
)
def test_shapes_that_are_not_a_scan(tmp_path, shape, options, message):
    np.save(tmp_path / "a.npy", np.zeros(shape, np.uint16))
    with pytest.raises(InputError, match=message):
        open_source(str(tmp_path / "a.npy"), options=options)
