"""Reader for the IDX format (MNIST, Fashion-MNIST), plain or gzip-compressed.

Layout: two zero bytes, a dtype code, the number of dims; then each dim as a big-endian uint32; then the data in
row-major order, big-endian.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import DatasetFormatError

# IDX dtype code -> big-endian numpy dtype
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetFormatError(f"{path}: corrupt or truncated gzip stream ({e}); re-download the file") from e


def parse_idx(raw: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode IDX bytes into a native-endian numpy array of the shape in the header.

    Raises:
        DatasetFormatError: bad magic, unknown dtype code, or a payload size that does not match the header.
    """
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DatasetFormatError(
            f"{source}: not an IDX file (magic {raw[:4].hex() or 'empty'}; IDX starts with 00 00 <dtype> <ndim>)"
        )
    code, ndim = raw[2], raw[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{k:02x}" for k in IDX_DTYPES)
        raise DatasetFormatError(f"{source}: unknown IDX dtype code 0x{code:02x} (known: {known})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetFormatError(f"{source}: truncated IDX header ({len(raw)} bytes, need {header} for {ndim} dims)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DatasetFormatError(
            f"{source}: IDX payload is {len(raw) - header} bytes, header shape {shape} of {dtype.name} needs {expected}"
            " (truncated or corrupt file)"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=True)


def read_idx(
    path: str | os.PathLike, *, dtype_code: int | None = None, shape: Sequence[int | None] | None = None
) -> np.ndarray:
    """Read an IDX file (gzip detected from its content, not its name) into a numpy array.

    Args:
        dtype_code: if given, the IDX dtype code the file must have (0x08 for uint8).
        shape: if given, the shape the file must have; ``None`` entries match any size (e.g. ``(None, 28, 28)``).

    Raises:
        DatasetFormatError: malformed file, or a dtype/shape other than the expected one.
    """
    path = Path(path)
    raw = _read_bytes(path)
    data = parse_idx(raw, str(path))
    if dtype_code is not None and raw[2] != dtype_code:
        raise DatasetFormatError(f"{path}: IDX dtype code is 0x{raw[2]:02x}, expected 0x{dtype_code:02x}")
    if shape is not None:
        ok = len(shape) == data.ndim and all(s is None or s == d for s, d in zip(shape, data.shape))
        if not ok:
            want = tuple("N" if s is None else s for s in shape)
            raise DatasetFormatError(f"{path}: IDX shape is {data.shape}, expected {want}")
    return data
