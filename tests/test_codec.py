"""The state codec: exact round trips, and a clear error for anything that is not a valid blob."""

from __future__ import annotations

import pytest
import torch

from hytrec.model.config import HyTRecConfig
from hytrec.model.state import StateBatch, StateCodecError, decode_state, encode_state
from tests.helpers_model import make_model, random_history


@pytest.fixture(scope="module")
def model_and_state():
    model = make_model()
    items, ts = random_history(40, model.cfg.n_items, seed=1)
    with torch.inference_mode():
        state = model.build_state(items[None], ts[None], torch.tensor([40]))
    return model, state


def fields_equal(a: StateBatch, b: StateBatch) -> bool:
    return all(
        torch.equal(getattr(a, f), getattr(b, f)) for f in ("summary", "last_ts", "count", "ring_items", "ring_ts")
    )


def test_round_trip_fp32_is_exact(model_and_state) -> None:
    model, state = model_and_state
    blob = encode_state(state, model.cfg, "v1")
    back = decode_state(blob, model.cfg, "v1")
    assert torch.equal(back.tadn, state.tadn) and fields_equal(back, state)
    assert encode_state(back, model.cfg, "v1") == blob


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_round_trip_compressed_is_stable(model_and_state, dtype: str) -> None:
    model, state = model_and_state
    blob = encode_state(state, model.cfg, "v1", dtype)
    back = decode_state(blob, model.cfg, "v1")
    assert encode_state(back, model.cfg, "v1", dtype) == blob  # idempotent after the first rounding
    assert fields_equal(back, state)
    assert torch.allclose(back.tadn, state.tadn, rtol=1e-2, atol=1e-3)
    assert len(blob) < len(encode_state(state, model.cfg, "v1", "float32"))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_as_stored_equals_the_codec_round_trip(model_and_state, dtype: str) -> None:
    """The offline evaluation's stand-in for a store round trip is exactly what the codec gives back."""
    model, state = model_and_state
    back = decode_state(encode_state(state, model.cfg, "v1", dtype), model.cfg, "v1")
    stored = state.as_stored(dtype)
    assert torch.equal(stored.tadn, back.tadn) and fields_equal(stored, back)


def test_default_config_state_size() -> None:
    cfg = HyTRecConfig(n_items=10)
    state = StateBatch.empty(cfg, 1)
    state.ring_items[:] = 5
    assert len(encode_state(state, cfg, "v1", "float16")) <= 32 * 1024


def test_empty_ring_round_trip() -> None:
    cfg = HyTRecConfig(n_items=10)
    blob = encode_state(StateBatch.empty(cfg, 1), cfg, "v")
    back = decode_state(blob, cfg, "v")
    assert back.count.item() == 0 and (back.ring_items == 0).all()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[:-1], "checksum|bytes"),
        (lambda b: b[:10], "truncated"),
        (lambda b: b[: len(b) // 2], "checksum|bytes"),
        (lambda b: b[:100] + bytes([b[100] ^ 0x40]) + b[101:], "checksum"),
        (lambda b: b"XXXX" + b[4:], "magic"),
        (lambda b: b"", "truncated"),
    ],
)
def test_bad_blobs_raise(model_and_state, mutate, message: str) -> None:
    model, state = model_and_state
    blob = encode_state(state, model.cfg, "v1")
    with pytest.raises(StateCodecError, match=message):
        decode_state(mutate(blob), model.cfg, "v1")


def test_wrong_model_version_or_shape_raises(model_and_state) -> None:
    model, state = model_and_state
    blob = encode_state(state, model.cfg, "v1")
    with pytest.raises(StateCodecError, match="model version"):
        decode_state(blob, model.cfg, "v2")
    other = HyTRecConfig(n_items=300, d_model=32)
    with pytest.raises(StateCodecError, match="shapes"):
        decode_state(blob, other, "v1")


def test_layout_version_checked(model_and_state) -> None:
    import struct
    import zlib

    model, state = model_and_state
    blob = bytearray(encode_state(state, model.cfg, "v1"))
    blob[4:6] = struct.pack("<H", 99)
    blob[-4:] = struct.pack("<I", zlib.crc32(bytes(blob[:-4])))
    with pytest.raises(StateCodecError, match="layout version 99"):
        decode_state(bytes(blob), model.cfg, "v1")
