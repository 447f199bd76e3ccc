"""A user's serving state and its compact binary codec.

The state is everything the recurrent form needs to continue a history and to answer a request:
the TADN matrices of every long-branch layer, the long-branch summary at the last event, the latest
timestamp, the event count, and a ring buffer of the last K (item row, timestamp), newest last.

Blob layout (little-endian; never pickle)::

    b"HYTS" | u16 layout | u8 dtype | u8 0 | u16 n_layers, n_heads, d_v, d_k, d_model, window, ring_len,
    len(model_version) | model_version (ascii) | u64 count | f64 last_ts |
    tadn[n_layers, n_heads, d_v, d_k] (dtype) | summary[d_model] (f32) |
    ring_items[ring_len] (i32) | ring_ts[ring_len] (f64) | [layout 2 only: u16 n_window_layers, W |
    hidden[n_window_layers, W, d_model] (dtype)] | u32 CRC-32 of all bytes before it
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from hytrec.model.config import STATE_DTYPES, HyTRecConfig
from hytrec.model.vocab import PAD_ROW

MAGIC = b"HYTS"
LAYOUT_VERSION = 1  # every variant without a long softmax block: unchanged since the first codec
LAYOUT_WITH_HIDDEN = 2  # hytrec-hybrid: layout 1 + u16 n_window_layers, W + hidden[n, W, d_model] (dtype)
_HIDDEN = struct.Struct("<HH")
_DTYPE_CODES = {"float32": 1, "float16": 2, "bfloat16": 3}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}
_HEADER = struct.Struct("<4sHBB8H")
_COUNTERS = struct.Struct("<Qd")
_CRC = struct.Struct("<I")


class StateCodecError(ValueError):
    """A state blob is truncated, corrupted, or was written for another layout or model version."""


@dataclass
class StateBatch:
    """States of B users, as tensors the model computes with (float32 TADN state)."""

    tadn: Tensor  # (B, n_long, H, d_v, d_k) float32
    summary: Tensor  # (B, d_model) long-branch output at the last event (zeros if none)
    last_ts: Tensor  # (B,) float64, latest timestamp seen
    count: Tensor  # (B,) int64, events applied
    ring_items: Tensor  # (B, K) int64 item rows, newest last, PAD_ROW where empty
    ring_ts: Tensor  # (B, K) float64
    hidden: Tensor  # (B, n_window_layers, W, d_model) float32: inputs of the long softmax block, newest last

    @classmethod
    def empty(cls, cfg: HyTRecConfig, batch: int) -> StateBatch:
        n_long = cfg.n_long if cfg.uses_long else 0
        h, dk = cfg.n_heads, cfg.head_dim
        return cls(
            tadn=torch.zeros(batch, n_long, h, dk, dk),
            summary=torch.zeros(batch, cfg.d_model),
            last_ts=torch.zeros(batch, dtype=torch.float64),
            count=torch.zeros(batch, dtype=torch.int64),
            ring_items=torch.full((batch, cfg.window), PAD_ROW, dtype=torch.int64),
            ring_ts=torch.zeros(batch, cfg.window, dtype=torch.float64),
            hidden=torch.zeros(batch, cfg.window_layers, cfg.long_window if cfg.window_layers else 0, cfg.d_model),
        )

    def __len__(self) -> int:
        return self.count.shape[0]

    def select(self, keep: Tensor, other: StateBatch) -> StateBatch:
        """Per user: this state where ``keep`` (B,) is True, else ``other``'s."""

        def pick(a: Tensor, b: Tensor) -> Tensor:
            return torch.where(keep.view(-1, *([1] * (a.dim() - 1))), a, b)

        return StateBatch(*(pick(getattr(self, f), getattr(other, f)) for f in _FIELDS))

    def user(self, i: int) -> StateBatch:
        return StateBatch(*(getattr(self, f)[i : i + 1] for f in _FIELDS))

    def as_stored(self, dtype: str) -> StateBatch:
        """This state as the codec stores it in ``dtype``: the TADN matrices rounded, the rest exact
        (``decode_state(encode_state(s, dtype=dtype))`` for every user, without the bytes)."""
        return replace(
            self, tadn=self.tadn.to(STATE_DTYPES[dtype]).float(), hidden=self.hidden.to(STATE_DTYPES[dtype]).float()
        )

    @staticmethod
    def cat(states: list[StateBatch]) -> StateBatch:
        return StateBatch(*(torch.cat([getattr(s, f) for s in states]) for f in _FIELDS))


_FIELDS = ("tadn", "summary", "last_ts", "count", "ring_items", "ring_ts", "hidden")


def _raw(t: Tensor, dtype: torch.dtype) -> bytes:
    t = t.detach().to("cpu", dtype).contiguous()
    if dtype == torch.bfloat16:
        t = t.view(torch.int16)
    arr = t.numpy()
    return arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def encode_state(state: StateBatch, cfg: HyTRecConfig, model_version: str, dtype: str | None = None) -> bytes:
    """Serialise a single-user :class:`StateBatch` (B = 1); ``dtype`` defaults to ``cfg.state_dtype``."""
    if len(state) != 1:
        raise ValueError("encode_state takes the state of exactly one user")
    dtype = dtype or cfg.state_dtype
    _, n_layers, h, dv, dk = state.tadn.shape
    keep = state.ring_items[0] != PAD_ROW
    ring_items, ring_ts = state.ring_items[0][keep], state.ring_ts[0][keep]
    mv = model_version.encode("ascii")
    has_hidden = state.hidden.shape[1] > 0
    parts = [
        _HEADER.pack(
            MAGIC,
            LAYOUT_WITH_HIDDEN if has_hidden else LAYOUT_VERSION,
            _DTYPE_CODES[dtype],
            0,
            n_layers,
            h,
            dv,
            dk,
            cfg.d_model,
            cfg.window,
            ring_items.numel(),
            len(mv),
        ),
        mv,
        _COUNTERS.pack(int(state.count[0]), float(state.last_ts[0])),
        _raw(state.tadn[0], STATE_DTYPES[dtype]),
        _raw(state.summary[0], torch.float32),
        _raw(ring_items, torch.int32),
        _raw(ring_ts, torch.float64),
    ]
    if has_hidden:
        parts += [_HIDDEN.pack(*state.hidden.shape[1:3]), _raw(state.hidden[0], STATE_DTYPES[dtype])]
    body = b"".join(parts)
    return body + _CRC.pack(zlib.crc32(body))


def decode_state(blob: bytes, cfg: HyTRecConfig, model_version: str) -> StateBatch:
    """Parse a blob written by :func:`encode_state` for this config and model version.

    Raises :class:`StateCodecError` with the reason for any truncated, corrupted or foreign blob.
    """
    if len(blob) < _HEADER.size + _COUNTERS.size + _CRC.size:
        raise StateCodecError(f"state blob truncated: {len(blob)} bytes")
    magic, layout, code, _, n_layers, h, dv, dk, d_model, window, ring_len, mv_len = _HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise StateCodecError("not a HyTRec state blob (bad magic)")
    expected_layout = LAYOUT_WITH_HIDDEN if cfg.window_layers else LAYOUT_VERSION
    if layout != expected_layout:
        raise StateCodecError(f"state layout version {layout} is not supported (expected {expected_layout})")
    (crc,) = _CRC.unpack_from(blob, len(blob) - _CRC.size)
    if zlib.crc32(blob[: -_CRC.size]) != crc:
        raise StateCodecError("state blob corrupted (checksum mismatch)")
    if code not in _CODE_DTYPES:
        raise StateCodecError(f"unknown state dtype code {code}")
    offset = _HEADER.size
    version = blob[offset : offset + mv_len].decode("ascii", errors="replace")
    offset += mv_len
    if version != model_version:
        raise StateCodecError(f"state written by model version {version!r}, expected {model_version!r}")
    n_long = cfg.n_long if cfg.uses_long else 0
    expected = (n_long, cfg.n_heads, cfg.head_dim, cfg.head_dim, cfg.d_model, cfg.window)
    if (n_layers, h, dv, dk, d_model, window) != expected or ring_len > window:
        raise StateCodecError(f"state shapes {(n_layers, h, dv, dk, d_model, window)} do not match {expected}")
    dtype = STATE_DTYPES[_CODE_DTYPES[code]]
    sizes = [n_layers * h * dv * dk * dtype.itemsize, d_model * 4, ring_len * 4, ring_len * 8]
    n_hidden = cfg.window_layers * cfg.long_window * d_model
    extra = _HIDDEN.size + n_hidden * dtype.itemsize if cfg.window_layers else 0
    if len(blob) != offset + _COUNTERS.size + sum(sizes) + extra + _CRC.size:
        raise StateCodecError(f"state blob has {len(blob)} bytes, layout says {offset + sum(sizes) + extra + 20}")
    count, last_ts = _COUNTERS.unpack_from(blob, offset)
    offset += _COUNTERS.size
    arrays = []
    for size, np_dtype in zip(sizes, ["<i2" if dtype == torch.bfloat16 else None, "<f4", "<i4", "<f8"], strict=True):
        np_dtype = np_dtype or {torch.float32: "<f4", torch.float16: "<f2"}[dtype]
        arrays.append(np.frombuffer(blob, dtype=np_dtype, count=size // np.dtype(np_dtype).itemsize, offset=offset))
        offset += size
    tadn = torch.from_numpy(arrays[0].copy())
    tadn = (tadn.view(torch.bfloat16) if dtype == torch.bfloat16 else tadn).float()
    state = StateBatch.empty(cfg, 1)
    state = replace(
        state,
        tadn=tadn.view(1, n_layers, h, dv, dk),
        summary=torch.from_numpy(arrays[1].astype(np.float32)).view(1, d_model),
        last_ts=torch.tensor([last_ts], dtype=torch.float64),
        count=torch.tensor([count], dtype=torch.int64),
    )
    if ring_len:
        state.ring_items[0, window - ring_len :] = torch.from_numpy(arrays[2].astype(np.int64))
        state.ring_ts[0, window - ring_len :] = torch.from_numpy(arrays[3].astype(np.float64))
    if cfg.window_layers:
        n_win, w = _HIDDEN.unpack_from(blob, offset)
        if (n_win, w) != (cfg.window_layers, cfg.long_window):
            raise StateCodecError(f"hidden window {(n_win, w)} does not match {(cfg.window_layers, cfg.long_window)}")
        np_dtype = {torch.float32: "<f4", torch.float16: "<f2", torch.bfloat16: "<i2"}[dtype]
        raw = torch.from_numpy(np.frombuffer(blob, dtype=np_dtype, count=n_hidden, offset=offset + _HIDDEN.size).copy())
        raw = raw.view(torch.bfloat16) if dtype == torch.bfloat16 else raw
        state.hidden = raw.float().view(1, n_win, w, d_model)
    return state
