"""Event-log reader (hytrec/eventlog.py), item vocabulary (model/vocab.py), leave-one-out split and batching
(training/data.py)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from hytrec.eventlog import DataFormatError, read_events
from hytrec.model.vocab import FIRST_ITEM_ROW, PAD_ROW, UNKNOWN_ROW, Vocab, VocabError
from hytrec.training.data import (
    BUCKET_LABELS,
    Interactions,
    eval_batches,
    leave_one_out,
    length_buckets,
    make_batch,
    train_batches,
)

HEADER = "user_id\titem_id\ttimestamp\n"


def write(path: Path, text: str, gz: bool = False) -> Path:
    data = text.encode("utf-8")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


# Two users; u1's events are out of order in the file and two share timestamp 20.
SMALL = HEADER + "u1\tb\t30\nu1\ta\t20\nu2\tc\t5\nu1\tc\t20\nu1\td\t10\nu2\ta\t6.5\n"


@pytest.mark.parametrize("gz", [False, True])
def test_load_plain_and_gzip_sorted_with_stable_ties(tmp_path: Path, gz: bool) -> None:
    # the name lies about the compression: detection is by magic bytes
    path = write(tmp_path / ("x.tsv" if gz else "x.tsv.gz"), SMALL, gz=gz)
    d = Interactions.from_file(path)
    assert d.user_ids == ["u1", "u2"]  # order of first appearance
    assert d.vocab.ids == ["a", "b", "c", "d"]  # sorted
    assert d.offsets.tolist() == [0, 4, 6]
    assert d.items.dtype == np.int64 and d.timestamps.dtype == np.float64
    items, ts = d.sequence(0)
    # tie at t=20: "a" comes before "c" in the file, so it stays first
    assert d.vocab.decode(items) == ["d", "a", "c", "b"]
    assert ts.tolist() == [10, 20, 20, 30]
    assert d.vocab.decode(d.sequence(1)[0]) == ["c", "a"]
    assert d.sequence(1)[1].tolist() == [5.0, 6.5]


def test_many_ties_keep_file_order(tmp_path: Path) -> None:
    rows = [f"u\ti{k}\t100\n" for k in range(50)]
    d = Interactions.from_file(write(tmp_path / "t.tsv", HEADER + "".join(rows)))
    assert d.vocab.decode(d.items) == [f"i{k}" for k in range(50)]


def test_a_tie_seed_shuffles_only_equal_timestamps_and_repeats_per_seed(tmp_path: Path) -> None:
    # two users interleaved; u gets 50 events at t=100 between a first and a last event
    rows = ["u\tfirst\t1\n", "v\tv0\t5\n"] + [f"u\ti{k}\t100\n" for k in range(50)] + ["u\tlast\t200\n"]
    path = write(tmp_path / "t.tsv", HEADER + "".join(rows))
    a, b, c = (Interactions.from_file(path, tie_seed=s) for s in (7, 7, 8))
    order = a.vocab.decode(a.sequence(0)[0])
    assert order[0] == "first" and order[-1] == "last"  # only the tied events move
    assert sorted(order[1:-1]) == sorted(f"i{k}" for k in range(50))
    assert order[1:-1] != [f"i{k}" for k in range(50)]  # not file order (50! orders: 1 in 3e64 by chance)
    assert a.sequence(0)[1].tolist() == [1.0] + [100.0] * 50 + [200.0]
    assert np.array_equal(a.items, b.items)  # same seed, same order
    assert not np.array_equal(a.items, c.items)
    assert a.vocab.decode(a.sequence(1)[0]) == ["v0"]


def test_column_order_extra_columns_and_crlf(tmp_path: Path) -> None:
    text = "timestamp\trating\titem_id\tuser_id\r\n3\t5\tx\t7\r\n1\t4\ty\t7\r\n"
    d = Interactions.from_file(write(tmp_path / "c.tsv", text))
    assert d.user_ids == ["7"]
    assert d.vocab.decode(d.items) == ["y", "x"]


def test_ids_stay_strings(tmp_path: Path) -> None:
    users, items, ts = read_events(write(tmp_path / "s.tsv", HEADER + "007\t0042\t1\n"))
    assert users.tolist() == ["007"] and items.tolist() == ["0042"] and ts.tolist() == [1.0]


def test_header_only_gives_empty_data(tmp_path: Path) -> None:
    d = Interactions.from_file(write(tmp_path / "h.tsv", HEADER))
    assert d.n_users == 0 and d.n_events == 0 and d.vocab.n_items == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty file"),
        ("\n\n", "empty file"),
        ("user_id\titem_id\n1\t2\n", "line 1: header .* lacks column\\(s\\) \\['timestamp'\\]"),
        ("user\titem\ttime\n1\t2\t3\n", "lacks column"),
        ("user_id item_id timestamp\n1 2 3\n", "lacks column"),
        (HEADER + "1\t2\t3\n1\t2\n", "line 3: expected 3 tab-separated fields, found 2"),
        (HEADER + "1\t2\t3\t4\n", "line 2: expected 3 tab-separated fields, found 4"),
        (HEADER + "1\t2\t3\n\n1\t2\t3\n", "line 3: expected 3 tab-separated fields, found 1"),
        (HEADER + "1\t2\t3\n1\t2\tyesterday\n", "line 3: timestamp 'yesterday' is not a finite number"),
        (HEADER + "1\t2\tnan\n", "line 2: timestamp 'nan'"),
        (HEADER + "1\t2\t\n", "line 2: timestamp ''"),
        (HEADER + "1\t\t3\n", "line 2: empty item_id"),
        ("user_id\titem_id\ttimestamp\titem_id\n1\t2\t3\t4\n", "duplicate column"),
    ],
)
@pytest.mark.parametrize("gz", [False, True])
def test_format_errors(tmp_path: Path, text: str, message: str, gz: bool) -> None:
    path = write(tmp_path / "bad.tsv", text, gz=gz)
    with pytest.raises(DataFormatError, match=message):
        Interactions.from_file(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="no such file"):
        Interactions.from_file(tmp_path / "nope.tsv.gz")
    assert issubclass(DataFormatError, ValueError)


def test_corrupt_gzip(tmp_path: Path) -> None:
    path = tmp_path / "c.gz"
    path.write_bytes(gzip.compress(SMALL.encode())[:20])
    with pytest.raises(DataFormatError, match="gzip"):
        Interactions.from_file(path)


# --------------------------------------------------------------------------------------------- vocab


def test_vocab_rows_unknown_and_round_trip(tmp_path: Path) -> None:
    v = Vocab.build(["b", "a", "c", "a"])
    assert (v.n_items, v.n_rows, len(v)) == (3, 5, 3)
    assert (PAD_ROW, UNKNOWN_ROW, FIRST_ITEM_ROW) == (0, 1, 2)
    enc = v.encode(["a", "b", "c", "zzz", ""])
    assert enc.dtype == np.int64 and enc.tolist() == [2, 3, 4, 1, 1]
    assert v.encode(np.array([["c", "a"], ["q", "b"]])).tolist() == [[4, 2], [1, 3]]  # keeps the shape
    assert v.encode([]).tolist() == [] and Vocab([]).encode(["a"]).tolist() == [UNKNOWN_ROW]
    assert v.decode([2, 3, 4]) == ["a", "b", "c"]
    assert v.decode(np.array([0, 1])) == ["<pad>", "<unk>"]
    assert "a" in v and "zzz" not in v and v.knows("c") and not v.knows("")
    with pytest.raises(ValueError):
        v.decode([5])
    path = tmp_path / "items.json"
    v.with_popularity([5, 0, 2]).save(path)
    w = Vocab.load(path)
    assert w == v.with_popularity([5, 0, 2]) and w != v and w.encode(["c", "q"]).tolist() == [4, 1]
    assert w.popularity.tolist() == [5, 0, 2] and w.by_popularity().tolist() == [0, 2, 1]
    with pytest.raises(VocabError, match="duplicate"):
        Vocab(["a", "a"])
    with pytest.raises(VocabError, match="popularity"):
        Vocab(["a", "b"], [1])
    for bad in ('{"items": ["a"]}', '{"item_ids": ["a"], "popularity": ["x"]}', "not json"):
        path.write_text(bad)
        with pytest.raises(VocabError, match="not an items file"):
            Vocab.load(path)


def test_vocab_keeps_given_row_order_and_both_lookups_agree() -> None:
    v = Vocab(["z", "a", "m"])
    assert v.encode(["a", "m", "z", "q"]).tolist() == [3, 4, 2, 1]
    assert [v.row(i) for i in ["a", "m", "z", "q"]] == [3, 4, 2, UNKNOWN_ROW]  # the serving lookup
    assert v.decode([2, 3, 4]) == ["z", "a", "m"]
    assert [v.item_id(r) for r in (PAD_ROW, UNKNOWN_ROW, 2, 4)] == [None, None, "z", "m"]
    ids = [f"i{k:03d}" for k in range(500)][::-1]
    big = Vocab(ids)
    probe = np.array([*ids[::7], "nope", "i1000"])
    assert big.encode(probe).tolist() == [big.row(str(i)) for i in probe]


def test_load_with_foreign_vocab_maps_unknown(tmp_path: Path) -> None:
    d = Interactions.from_file(write(tmp_path / "x.tsv", SMALL), vocab=Vocab(["a", "b"]))
    assert d.vocab.n_items == 2
    assert d.sequence(0)[0].tolist() == [1, 2, 1, 3]  # d, a, c, b


# --------------------------------------------------------------------------------------------- split


def test_leave_one_out_hand_made() -> None:
    users = ["A"] * 5 + ["B"] * 3 + ["C"] * 2 + ["D"]
    items = ["1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11"]
    ts = [1, 2, 3, 4, 5, 10, 20, 30, 7, 8, 9]
    d = Interactions.from_events(users, items, ts)
    s = leave_one_out(d)
    dec = d.vocab.decode
    # train: A -> 1,2,3 ; B -> 6 ; C, D (fewer than 3 events) whole
    assert s.train.user_ids == ["A", "B", "C", "D"]
    assert [dec(s.train.sequence(u)[0]) for u in range(4)] == [["1", "2", "3"], ["6"], ["9", "10"], ["11"]]
    # only A and B are evaluated
    assert s.valid.user_index.tolist() == [0, 1] and s.test.user_index.tolist() == [0, 1]
    assert dec(s.valid.targets) == ["4", "7"] and s.valid.request_ts.tolist() == [4.0, 20.0]
    assert dec(s.test.targets) == ["5", "8"] and s.test.request_ts.tolist() == [5.0, 30.0]
    assert [dec(s.valid.history.sequence(k)[0]) for k in range(2)] == [["1", "2", "3"], ["6"]]
    assert [dec(s.test.history.sequence(k)[0]) for k in range(2)] == [["1", "2", "3", "4"], ["6", "7"]]
    assert s.test.history.sequence(1)[1].tolist() == [10.0, 20.0]
    assert s.test.history_lengths.tolist() == [4, 2]
    assert s.test.history.user_ids == ["A", "B"]
    assert len(s.test) == 2 and s.test.buckets.tolist() == [0, 0]


def test_length_buckets() -> None:
    lengths = np.array([0, 99, 100, 499, 500, 999, 1000, 5000])
    assert length_buckets(lengths).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert BUCKET_LABELS == ("<100", "100-499", "500-999", ">=1000")


# --------------------------------------------------------------------------------------------- batches


def random_data(n_users: int = 60, seed: int = 0, max_len: int = 300) -> Interactions:
    rng = np.random.default_rng(seed)
    lens = rng.integers(2, max_len, n_users)
    lens[0] = 2000  # one very long user
    users = np.repeat([f"u{k}" for k in range(n_users)], lens)
    items = rng.integers(0, 500, len(users)).astype(str)
    ts = np.concatenate([np.sort(rng.integers(0, 10**6, n)) for n in lens]).astype(float)
    return Interactions.from_events(users, items, ts)


def check_batch_padding(d: Interactions, b, max_len: int | None = None) -> None:
    assert b.items.dtype == np.int64 and b.timestamps.dtype == np.float64 and b.lengths.dtype == np.int64
    assert b.items.shape == b.timestamps.shape == (len(b.index), int(b.lengths.max()))
    for row, u in enumerate(b.index):
        items, ts = d.sequence(u)
        if max_len is not None:
            items, ts = items[-max_len:], ts[-max_len:]
        n = b.lengths[row]
        assert n == len(items)
        assert np.array_equal(b.items[row, :n], items) and np.array_equal(b.timestamps[row, :n], ts)
        assert (b.items[row, n:] == 0).all() and (b.timestamps[row, n:] == ts[-1]).all()


def test_train_batches_cover_everything_once_within_budget() -> None:
    d = random_data()
    max_tokens = 1024
    seen: list[int] = []
    for b in train_batches(d, max_tokens, seed=3):
        check_batch_padding(d, b)
        assert b.n_tokens <= max_tokens or len(b) == 1  # only a lone over-long sequence may exceed it
        seen.extend(b.index.tolist())
    assert sorted(seen) == list(range(d.n_users))  # every user once, hence every event once
    # the 2000-event user is one untruncated sequence
    long_batches = [b for b in train_batches(d, max_tokens, seed=3) if 0 in b.index]
    assert long_batches[0].lengths.tolist() == [2000]


def test_train_batches_seeded_shuffle_and_options() -> None:
    d = random_data()
    order = lambda seed: [b.index.tolist() for b in train_batches(d, 4096, seed=seed)]  # noqa: E731
    assert order(1) == order(1) and order(1) != order(2)
    rng = np.random.default_rng(0)
    assert [b.index.tolist() for b in train_batches(d, 4096, seed=rng)] != [
        b.index.tolist() for b in train_batches(d, 4096, seed=rng)
    ]  # one Generator across epochs gives new orders
    sizes = [len(b) for b in train_batches(d, 10**6, max_batch_size=7)]
    assert max(sizes) <= 7 and sum(sizes) == d.n_users
    bucketed = list(train_batches(d, 4096, bucket_size=16, seed=0))
    assert sorted(i for b in bucketed for i in b.index.tolist()) == list(range(d.n_users))


def test_train_batches_min_len_skips_short() -> None:
    d = Interactions.from_events(["a", "b", "b", "c", "c", "c"], list("xyzxyz"), [1, 1, 2, 1, 2, 3])
    got = sorted(i for b in train_batches(d, 100) for i in b.index.tolist())
    assert got == [1, 2]  # user "a" has one event: no next-item target
    assert sorted(i for b in train_batches(d, 100, min_len=1) for i in b.index.tolist()) == [0, 1, 2]


def test_truncation_keeps_last_events() -> None:
    d = random_data()
    for b in train_batches(d, 2048, max_len=50, seed=0):
        assert b.items.shape[1] <= 50 and b.n_tokens <= 2048
        check_batch_padding(d, b, max_len=50)
    b = make_batch(d, np.array([0]), max_len=5)
    assert np.array_equal(b.items[0], d.sequence(0)[0][-5:])


def test_eval_batches_deterministic_and_complete() -> None:
    d = random_data(seed=1)
    runs = [[b.index.tolist() for b in eval_batches(d, 3000)] for _ in range(2)]
    assert runs[0] == runs[1]
    flat = [i for idx in runs[0] for i in idx]
    assert sorted(flat) == list(range(d.n_users))
    lens = d.lengths[flat]
    assert (np.diff(lens) >= 0).all()  # ascending length
    for b in eval_batches(d, 3000):
        check_batch_padding(d, b)


def test_batches_from_split_and_targets() -> None:
    d = random_data(n_users=10)
    s = leave_one_out(d)
    for b in eval_batches(s.test.history, 5000):
        for row, k in enumerate(b.index):
            u = s.test.user_index[k]
            assert b.items[row, b.lengths[row] - 1] == d.sequence(u)[0][-2]
            assert s.test.targets[k] == d.sequence(u)[0][-1]
    assert sum(len(b) for b in train_batches(s.train, 5000)) == 10


def test_batch_to_torch() -> None:
    torch = pytest.importorskip("torch")
    b = make_batch(random_data(n_users=3), np.array([1, 2]))
    t = b.to_torch()
    assert t["items"].dtype == torch.int64 and t["timestamps"].dtype == torch.float64
    assert t["lengths"].tolist() == b.lengths.tolist()
