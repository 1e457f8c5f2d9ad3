"""A small safetensors reader and streaming writer of our own.

Why not the safetensors package: we need (1) a header check that turns a truncated or garbled
shard into an error naming the file before anything is written, (2) raw bytes of F8_E8M0 /
F8_E4M3 tensors without any numeric conversion, and (3) a writer that streams one tensor at a
time to a temporary file, fsyncs and renames it, and lays bytes out the same way every run
(names sorted, header keys sorted), so that an interrupted and resumed conversion gives
byte-identical files. The files are plain safetensors: any reader loads them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConversionError

DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "BOOL": (torch.bool, 1),
    "U8": (torch.uint8, 1),
    "I8": (torch.int8, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E8M0": (torch.float8_e8m0fnu, 1),
    "I16": (torch.int16, 2),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I32": (torch.int32, 4),
    "F32": (torch.float32, 4),
    "I64": (torch.int64, 8),
    "F64": (torch.float64, 8),
}
_MAX_HEADER = 100 << 20  # the safetensors format's own limit


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype code, e.g. "F8_E4M3"
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def dtype_code(dtype: torch.dtype) -> str:
    return next(code for code, (dt, _) in DTYPES.items() if dt == dtype)


class ShardReader:
    """Parses and checks one shard's header; reads tensors with pread (no mmap kept open)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tensors = self._parse()

    def _fail(self, why: str, tensor: str | None = None) -> ConversionError:
        return ConversionError(f"corrupt safetensors shard: {why}", file=self.path.name, tensor=tensor)

    def _parse(self) -> dict[str, TensorInfo]:
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise self._fail(f"{size} bytes, shorter than the 8-byte header length")
                (n,) = struct.unpack("<Q", head)
                if n > min(_MAX_HEADER, size - 8):
                    raise self._fail(f"header length {n} does not fit in a {size}-byte file")
                raw = f.read(n)
        except OSError as e:
            raise ConversionError(f"cannot read shard: {e}", file=self.path.name) from None
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._fail(f"header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise self._fail("header is not a JSON object")
        data_start = 8 + n
        tensors: dict[str, TensorInfo] = {}
        spans = []
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            try:
                code, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
                itemsize = DTYPES[code][1]
                ok = all(isinstance(d, int) and d >= 0 for d in shape) and isinstance(begin, int) and isinstance(end, int)
            except (KeyError, TypeError, ValueError):
                raise self._fail("malformed header entry", name) from None
            if not ok or end - begin != math.prod(shape) * itemsize or begin < 0:
                raise self._fail(f"offsets [{begin}, {end}) do not hold {code}{list(shape)}", name)
            if data_start + end > size:
                raise self._fail(f"data ends at byte {data_start + end} of a {size}-byte file (truncated?)", name)
            tensors[name] = TensorInfo(name, code, shape, data_start + begin, end - begin)
            spans.append((begin, end, name))
        spans.sort()
        for (b0, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise self._fail(f"tensors {n0} and {n1} overlap")
        return tensors

    def read_bytes(self, name: str) -> torch.Tensor:
        """The tensor's raw bytes as a flat uint8 tensor."""
        info = self.tensors[name]
        buf = bytearray(info.nbytes)
        with open(self.path, "rb") as f:
            f.seek(info.start)
            if f.readinto(buf) != info.nbytes:
                raise self._fail("short read", name)
        return torch.frombuffer(buf, dtype=torch.uint8) if info.nbytes else torch.empty(0, dtype=torch.uint8)

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        return self.read_bytes(name).view(DTYPES[info.dtype][0]).reshape(info.shape)


class ShardWriter:
    """Writes a shard whose tensor list is known up front, one tensor at a time, atomically.

    The data lies in sorted-name order; `finish()` fsyncs, renames the temporary file onto the
    final name and fsyncs the directory. A file under the final name is therefore complete.
    """

    def __init__(self, path: str | Path, specs: dict[str, tuple[str, tuple[int, ...]]]):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".partial")
        self.order = sorted(specs)
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        self.sizes = {}
        for name in self.order:
            code, shape = specs[name]
            nbytes = math.prod(shape) * DTYPES[code][1]
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.sizes[name] = nbytes
            offset += nbytes
        raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.next = 0
        self.file = open(self.tmp, "wb")
        self._write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.order[self.next]
        if name != expected:
            raise ConversionError(f"writer expected {expected} next, got {name}", file=self.path.name)
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        if data.nbytes != self.sizes[name]:
            raise ConversionError(f"{data.nbytes} bytes for a {self.sizes[name]}-byte tensor", file=self.path.name, tensor=name)
        self._write(data)
        self.next += 1

    def finish(self) -> None:
        if self.next != len(self.order):
            raise ConversionError(f"shard closed after {self.next} of {len(self.order)} tensors", file=self.path.name)
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
            fsync_dir(self.path.parent)
        except OSError as e:
            self.abort()
            raise _disk_error(e, self.path) from None

    def abort(self) -> None:
        # close() flushes the buffered tail first; on a full disk that fails again, and the
        # error being reported is the first one. The file is closed either way.
        with contextlib.suppress(OSError):
            self.file.close()
        self.tmp.unlink(missing_ok=True)

    def _write(self, data) -> None:
        try:
            write_all(self.file, data)
        except OSError as e:
            self.abort()
            raise _disk_error(e, self.path) from None


def write_all(file, data) -> None:
    """The one place shard bytes reach the disk (tests make it fail with ENOSPC)."""
    file.write(data)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: Path, data: bytes) -> None:
    """Small files (index, config, manifest, copies): temp name, fsync, rename."""
    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "wb") as f:
            write_all(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _disk_error(e, path) from None


def _disk_error(e: OSError, path: Path) -> ConversionError:
    if e.errno == errno.ENOSPC:
        return ConversionError(f"disk full while writing {path}: free space and rerun with --resume", file=path.name)
    return ConversionError(f"cannot write {path}: {e}", file=path.name)
