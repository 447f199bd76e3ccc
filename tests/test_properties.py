"""Property tests (hypothesis): the state codec rejects anything that is not a blob it wrote, with its typed
error, and streaming parity holds for random histories, time gaps and batch splits.

Example counts are small (2 CPU cores, the whole suite within minutes); the hypothesis database is off so
nothing is written into the checkout.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hytrec.model.checkpoint import Checkpoint
from hytrec.model.serving import ServingModel
from hytrec.model.state import MAGIC, StateBatch, StateCodecError, decode_state, encode_state
from hytrec.model.vocab import FIRST_ITEM_ROW, Vocab
from hytrec.service.states import decode_snapshot
from hytrec.state_store import CorruptStateError, Snapshot
from hytrec.state_store import metrics as store_metrics
from tests.helpers_model import make_model, random_history

VERSION = "prop-v1"
CODEC = settings(max_examples=60, deadline=None, database=None)
PARITY = settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
# A small model with short chunks and a short window, so modest histories exercise the chunked form, the
# stepped form, both in one batch, and ring-buffer wrap-around.
MODEL = make_model(d_model=32, chunk_size=16, window=16)
SERVING = ServingModel(Checkpoint(MODEL, "hytrec", MODEL.cfg, Vocab([str(i) for i in range(300)]), VERSION, {}))
EXACT = ("count", "last_ts", "ring_items", "ring_ts")


def _blob(length: int = 40, seed: int = 1) -> bytes:
    items, ts = random_history(length, MODEL.cfg.n_items, seed=seed)
    with torch.inference_mode():
        state = MODEL.build_state(items[None], ts[None], torch.tensor([length]))
    return encode_state(state, MODEL.cfg, VERSION)


BLOB = _blob()


# ------------------------------------------------------------------ codec: reject cleanly, with StateCodecError
def _rejected(blob: bytes) -> None:
    with pytest.raises(StateCodecError):
        decode_state(blob, MODEL.cfg, VERSION)


@CODEC
@given(st.binary(max_size=4096))
def test_random_bytes_are_rejected(blob: bytes) -> None:
    _rejected(blob)


@CODEC
@given(st.binary(max_size=len(BLOB) + 64))
def test_random_bytes_behind_a_valid_magic_and_layout_are_rejected(tail: bytes) -> None:
    _rejected(MAGIC + BLOB[len(MAGIC) : len(MAGIC) + 2] + tail)


@CODEC
@given(st.integers(0, len(BLOB) - 1))
def test_every_truncation_is_rejected(length: int) -> None:
    _rejected(BLOB[:length])


@CODEC
@given(st.binary(min_size=1, max_size=64))
def test_trailing_bytes_are_rejected(extra: bytes) -> None:
    _rejected(BLOB + extra)


@CODEC
@given(st.lists(st.integers(0, len(BLOB) * 8 - 1), min_size=1, max_size=2, unique=True))
def test_bit_flips_are_rejected(bits: list[int]) -> None:
    """One or two flipped bits anywhere (header, payload or checksum): CRC-32 detects every such error."""
    flipped = bytearray(BLOB)
    for bit in bits:
        flipped[bit // 8] ^= 1 << (bit % 8)
    _rejected(bytes(flipped))


@CODEC
@given(st.integers(0, len(BLOB) - 4), st.binary(min_size=1, max_size=4))
def test_overwritten_bursts_are_rejected(at: int, junk: bytes) -> None:
    """A burst of up to 32 bits overwritten (CRC-32 detects every burst that short)."""
    damaged = bytearray(BLOB)
    damaged[at : at + len(junk)] = junk
    if bytes(damaged) != BLOB:
        _rejected(bytes(damaged))


@CODEC
@given(st.binary(max_size=2048) | st.integers(0, len(BLOB) - 1).map(lambda n: BLOB[:n]))
def test_decode_snapshot_turns_any_bad_blob_into_corrupt_state_error(blob: bytes) -> None:
    """The service's decode path: the store's CorruptStateError naming the user and version, and counted."""
    before = store_metrics.CORRUPT_VALUES._value.get()
    snap = Snapshot(user_id="u-prop", version=1, blob=blob, model_version=VERSION)
    with pytest.raises(CorruptStateError) as caught:
        decode_snapshot(SERVING, snap)
    assert caught.value.user_id == "u-prop" and caught.value.model_version == VERSION
    assert "StateCodecError" in caught.value.reason
    assert store_metrics.CORRUPT_VALUES._value.get() == before + 1


def test_the_valid_blob_still_decodes() -> None:
    """The properties above reject because the input is bad, not because every input is rejected."""
    back = decode_state(BLOB, MODEL.cfg, VERSION)
    assert encode_state(back, MODEL.cfg, VERSION) == BLOB
    assert decode_snapshot(SERVING, Snapshot(user_id="u", version=1, blob=BLOB, model_version=VERSION)) is not None


# ------------------------------------------------------------------ parity: random histories and splits
GAP = st.one_of(
    st.just(0.0),  # bursts
    st.floats(0.001, 3600.0),  # within a session
    st.floats(3600.0, 3e7),  # days to a year
    st.floats(-5000.0, -0.001),  # out of order (applied with Delta = 0)
)


@st.composite
def user_history(draw: st.DrawFn) -> tuple[list[tuple[int, float]], list[int]]:
    """Events (item row, ts) and the cut points that split them into ingest batches."""
    n = draw(st.integers(0, 100))
    rows = draw(st.lists(st.integers(FIRST_ITEM_ROW, MODEL.cfg.n_items + FIRST_ITEM_ROW - 1), min_size=n, max_size=n))
    gaps = draw(st.lists(GAP, min_size=n, max_size=n))
    ts, events = 1.6e9, []
    for row, gap in zip(rows, gaps, strict=True):
        ts += gap
        events.append((row, ts))
    cuts = sorted(draw(st.sets(st.integers(1, max(n - 1, 1)), max_size=4))) if n > 1 else []
    return events, cuts


def _pieces(events: list[tuple[int, float]], cuts: list[int]) -> list[list[tuple[int, float]]]:
    bounds = [0, *cuts, len(events)]
    return [events[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def _stepped(events: list[tuple[int, float]]) -> StateBatch:
    """Reference: the recurrent step, one event at a time."""
    state = StateBatch.empty(MODEL.cfg, 1)
    for row, ts in events:
        state = MODEL.step(state, torch.tensor([row]), torch.tensor([ts], dtype=torch.float64))
    return state


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    return float((a - b).norm()) <= rel * float(b.norm()) + 1e-6


@PARITY
@given(st.lists(user_history(), min_size=1, max_size=3))
def test_random_histories_and_batch_splits_give_the_stepped_state_and_scores(users: list) -> None:
    """Users ingest their history in random batches (each batch through ``ServingModel.advance`` with the
    others' batches of the same round, and a codec round trip in between, as the service does): the state and
    the scores equal the one-event-at-a-time reference."""
    rounds = max(len(_pieces(events, cuts)) for events, cuts in users)
    blobs: list[bytes | None] = [None] * len(users)
    with torch.inference_mode():
        for r in range(rounds):
            pieces = [_pieces(events, cuts) for events, cuts in users]
            batch = [p[r] if r < len(p) else [] for p in pieces]
            states = [None if b is None else SERVING.decode(b) for b in blobs]
            advanced = SERVING.advance(states, batch)
            blobs = [SERVING.encode(advanced.user(i)) for i in range(len(users))]
        for (events, _), blob in zip(users, blobs, strict=True):
            got, want = SERVING.decode(blob), _stepped(events)
            for f in dataclasses.fields(StateBatch):
                a, b = getattr(got, f.name), getattr(want, f.name)
                if f.name in EXACT:
                    assert torch.equal(a, b), (f.name, len(events))
                elif isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                    assert _close(a, b), (f.name, len(events))
            now = torch.tensor([(events[-1][1] if events else 1.6e9) + 60.0], dtype=torch.float64)
            s_got = MODEL.item_scores(MODEL.user_vector(got, now))
            s_want = MODEL.item_scores(MODEL.user_vector(want, now))
            assert _close(s_got, s_want, 1e-4), len(events)
