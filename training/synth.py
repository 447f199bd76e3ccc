"""Synthetic interaction logs in the dataset format (``user_id<TAB>item_id<TAB>timestamp``).

The generative story, vectorised over all events at once:

- Items are dealt into latent genres; inside a genre, popularity is Zipf over a random item order.
- Each user has stable long-term tastes: a Dirichlet mixture over a few genres.
- Events come in sessions (geometric lengths). A session's genre is drawn from the user's tastes, or, with
  probability ``p_intent``, is a transient intent (a uniformly random genre) that lasts only that session.
  Inside a session an event follows the session genre, except with probability ``p_taste_event``, where it
  is drawn from the long-term tastes.
- Gaps are log-normal: about a minute inside a session; between sessions, a per-user median that spreads
  the user's sessions over about a year (clipped to 30 minutes .. 3 days).
- Re-consumption: a session opens with an old item with probability ``p_revisit`` (after the long gap),
  and any event repeats an old one with probability ``p_reconsume``. The repeated item is a uniformly drawn
  earlier fresh event at least ``min_back`` events back, so favourites come back in proportion to how often
  they were consumed.

Deterministic for a seed (the gzip header carries no time stamp, so the bytes are reproducible too).
"""

from __future__ import annotations

import gzip
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DAY = 86_400.0


@dataclass(frozen=True)
class SynthConfig:
    """Parameters of the generator (see the module docstring)."""

    n_users: int = 1000
    n_items: int = 5000
    events_per_user: str | int = "200"
    seed: int = 0
    start_time: int = 1_600_000_000
    n_genres: int = 20
    tastes_per_user: int = 3
    zipf_a: float = 0.8
    mean_session_len: float = 6.0
    p_intent: float = 0.35
    p_taste_event: float = 0.1
    p_revisit: float = 0.3
    p_reconsume: float = 0.03
    min_back: int = 20
    within_gap_median_s: float = 60.0
    within_gap_sigma: float = 1.0
    between_gap_sigma: float = 1.0
    span_days: float = 365.0
    min_between_median_s: float = 1800.0
    max_between_median_s: float = 3 * DAY


@dataclass(frozen=True, eq=False)
class SynthLog:
    """Generated events grouped by user, in time order. Users are 1..n_users, items 1..n_items."""

    users: np.ndarray  # int64 (N,)
    items: np.ndarray  # int64 (N,)
    timestamps: np.ndarray  # int64 seconds (N,)
    session: np.ndarray  # int64 (N,), global session index
    reconsumed: np.ndarray  # bool (N,), True where the item repeats an earlier event of the user
    item_genre: np.ndarray  # int64 (n_items,), genre of item id k + 1
    planted: np.ndarray | None = None  # bool (N,): first event of a planted long-range return (scenarios only)

    def __len__(self) -> int:
        return len(self.users)


def parse_events_spec(spec: str | int, n_users: int, rng: np.random.Generator) -> np.ndarray:
    """Events per user (int64, >= 1) from ``"N"`` (fixed), ``"MIN:MAX"`` (uniform, inclusive) or
    ``"lognormal:MEAN[:SIGMA]"`` (log-normal with that mean, default sigma 1, at least 3)."""
    text = str(spec).strip()
    try:
        if text.startswith(("lognormal:", "ln:")):
            parts = text.split(":")[1:]
            mean = float(parts[0])
            sigma = float(parts[1]) if len(parts) > 1 else 1.0
            if mean <= 0 or sigma < 0 or len(parts) > 2:
                raise ValueError
            mu = np.log(mean) - sigma**2 / 2
            return np.maximum(np.round(rng.lognormal(mu, sigma, n_users)), 3).astype(np.int64)
        if ":" in text:
            lo, hi = (int(x) for x in text.split(":"))
            if not 1 <= lo <= hi:
                raise ValueError
            return rng.integers(lo, hi + 1, size=n_users, dtype=np.int64)
        n = int(text)
        if n < 1:
            raise ValueError
        return np.full(n_users, n, dtype=np.int64)
    except ValueError:
        raise ValueError(
            f"bad events-per-user spec {spec!r}: use N, MIN:MAX or lognormal:MEAN[:SIGMA] (positive numbers)"
        ) from None


def generate(cfg: SynthConfig) -> SynthLog:
    """Generate a log; see the module docstring for the model."""
    if cfg.n_users < 1 or cfg.n_items < 1:
        raise ValueError("n_users and n_items must be >= 1")
    rng = np.random.default_rng(cfg.seed)
    n_per_user = parse_events_spec(cfg.events_per_user, cfg.n_users, rng)
    offsets = np.zeros(cfg.n_users + 1, dtype=np.int64)
    np.cumsum(n_per_user, out=offsets[1:])
    n = int(offsets[-1])
    user_of = np.repeat(np.arange(cfg.n_users), n_per_user)
    starts = offsets[:-1]
    pos_in_user = np.arange(n) - starts[user_of]

    # Genres: item perm[j] belongs to genre j % G with popularity rank j // G inside it.
    n_genres = min(cfg.n_genres, cfg.n_items)
    perm = rng.permutation(cfg.n_items)
    j = np.arange(cfg.n_items)
    sizes = np.bincount(j % n_genres, minlength=n_genres)
    table = np.full((n_genres, int(sizes.max())), -1, dtype=np.int64)
    table[j % n_genres, j // n_genres] = perm
    item_genre = np.empty(cfg.n_items, dtype=np.int64)
    item_genre[perm] = j % n_genres
    cum_w = np.cumsum(1.0 / np.arange(1, table.shape[1] + 1) ** cfg.zipf_a)

    # Long-term tastes: k genres per user with Dirichlet weights.
    k = min(cfg.tastes_per_user, n_genres)
    user_genres = np.argsort(rng.random((cfg.n_users, n_genres)), axis=1)[:, :k]
    taste_cum = np.cumsum(rng.dirichlet(np.ones(k), size=cfg.n_users), axis=1)

    def draw_taste(users: np.ndarray) -> np.ndarray:
        slot = (taste_cum[users] < rng.random(len(users))[:, None]).sum(axis=1)
        return user_genres[users, np.minimum(slot, k - 1)]

    # Sessions and their genres.
    new_session = rng.random(n) < 1.0 / cfg.mean_session_len
    new_session[starts[n_per_user > 0]] = True
    session = np.cumsum(new_session) - 1
    session_user = user_of[new_session]
    intent = rng.random(len(session_user)) < cfg.p_intent
    session_genre = np.where(intent, rng.integers(n_genres, size=len(session_user)), draw_taste(session_user))
    genre = session_genre[session]
    from_taste = rng.random(n) < cfg.p_taste_event
    genre[from_taste] = draw_taste(user_of[from_taste])

    # Zipf draw inside the genre.
    u = rng.random(n) * cum_w[sizes[genre] - 1]
    rank = np.minimum(np.searchsorted(cum_w, u, side="right"), sizes[genre] - 1)
    items = table[genre, rank]

    # Re-consumption of earlier fresh events at least min_back events back.
    cand = (new_session & (rng.random(n) < cfg.p_revisit)) | (rng.random(n) < cfg.p_reconsume)
    cand &= pos_in_user > cfg.min_back
    fresh = np.flatnonzero(~cand)
    t = np.flatnonzero(cand)
    lo = np.searchsorted(fresh, starts[user_of[t]], side="left")
    hi = np.searchsorted(fresh, t - cfg.min_back, side="right")
    ok = hi > lo
    t, lo, hi = t[ok], lo[ok], hi[ok]
    src = fresh[lo + np.floor(rng.random(len(t)) * (hi - lo)).astype(np.int64)]
    items[t] = items[src]
    reconsumed = np.zeros(n, dtype=bool)
    reconsumed[t] = True

    # Time gaps.
    sessions_per_user = np.bincount(session_user, minlength=cfg.n_users)
    between_median = np.clip(
        cfg.span_days * DAY / np.maximum(sessions_per_user, 1),
        cfg.min_between_median_s,
        cfg.max_between_median_s,
    )
    within = rng.lognormal(np.log(cfg.within_gap_median_s), cfg.within_gap_sigma, n)
    between = rng.lognormal(np.log(between_median[user_of]), cfg.between_gap_sigma)
    gaps = np.where(new_session, between, within)
    gaps[starts[n_per_user > 0]] = 0.0
    cum = np.cumsum(gaps)
    user_start = cfg.start_time + rng.uniform(0, 30 * DAY, cfg.n_users)
    ts = np.floor(user_start[user_of] + (cum - cum[starts][user_of])).astype(np.int64)

    return SynthLog(
        users=user_of.astype(np.int64) + 1,
        items=items + 1,
        timestamps=ts,
        session=session.astype(np.int64),
        reconsumed=reconsumed,
        item_genre=item_genre,
    )


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode("utf-8")
    if path.name.endswith(".gz"):
        buf = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=6, mtime=0) as gz:
            gz.write(data)
        data = buf.getvalue()
    path.write_bytes(data)


def write_interactions(log: SynthLog, path: str | Path) -> None:
    """Write ``user_id item_id timestamp`` with a header; gzip when the name ends in ``.gz``."""
    rows = zip(log.users.tolist(), log.items.tolist(), log.timestamps.tolist(), strict=True)
    body = "".join(f"{u}\t{i}\t{t}\n" for u, i, t in rows)
    _write_text(Path(path), "user_id\titem_id\ttimestamp\n" + body)


def write_items(log: SynthLog, path: str | Path) -> None:
    """Write ``item_id title genres`` for every item (gzip when the name ends in ``.gz``)."""
    lines = [f"{k + 1}\tItem {k + 1}\tgenre-{g}\n" for k, g in enumerate(log.item_genre.tolist())]
    _write_text(Path(path), "item_id\ttitle\tgenres\n" + "".join(lines))


def items_path_for(out: str | Path) -> Path:
    """Where the item table goes beside ``out``: ``items.tsv`` for ``.../interactions*``, else
    ``<stem>.items.tsv``."""
    out = Path(out)
    name = out.name
    if name.startswith("interactions"):
        return out.with_name("items.tsv")
    for suffix in (".tsv.gz", ".gz", ".tsv"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return out.with_name(f"{name}.items.tsv")


# --------------------------------------------------------------------------------- long-range scenarios

SCENARIOS: tuple[str, ...] = ("dormant", "periodic", "reconsume")


@dataclass(frozen=True)
class LongRangeConfig:
    """A log with a planted dependency beyond the short window (docs/long_history.md states the story and
    the values used there; they were fixed before any model was trained on these logs).

    Each user has background tastes (``bg_tastes`` genres, sessions as in :func:`generate` but simpler) and
    one planted interest: a genre D that the background never touches. D appears in bursts of ``burst``
    events: one at the start of the history, ``returns`` more, each ``gap`` background events after the
    previous burst (jittered uniformly by +-``jitter`` of it; ``periodic``: exactly ``gap``), and the test
    event is the first event of one last return, ``gap`` events after the previous burst. So the item of
    the test event depends on events at least ``(1 - jitter) * gap`` events back.

    - ``dormant``: burst items are fresh Zipf draws from D (the model must remember the genre); the first
      event of a burst comes after a long pause (``pause_days``, longer than any background gap), a cue
      that says *that* the old interest returns but not *which* one.
    - ``reconsume``: the same, but burst items are drawn uniformly from the user's ``favourites`` items of D
      (fixed per user; the first burst is every favourite once, in random order): old favourites come back,
      the item itself must be remembered.
    - ``periodic``: fresh draws from D like ``dormant``, every exactly ``gap`` events and with no pause cue:
      the return is predictable only by counting events since the last burst.
    """

    scenario: str = "dormant"
    gap: int = 1000
    n_users: int = 400
    n_items: int = 2000
    n_genres: int = 20
    seed: int = 0
    returns: int = 2
    burst: int = 4
    jitter: float = 0.25
    bg_tastes: int = 2
    p_intent: float = 0.2
    favourites: int = 5
    zipf_a: float = 0.8
    mean_session_len: float = 8.0
    within_gap_median_s: float = 60.0
    between_gap_median_s: float = 6 * 3600.0
    between_gap_clip_s: tuple[float, float] = (600.0, 3 * DAY)
    pause_days: float = 30.0
    start_time: int = 1_600_000_000

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(f"scenario must be one of {SCENARIOS}, got {self.scenario!r}")
        if self.gap < 1 or self.returns < 0 or self.burst < 1 or not 0 <= self.jitter < 1:
            raise ValueError("gap and burst must be >= 1, returns >= 0, 0 <= jitter < 1")
        if self.n_genres < self.bg_tastes + 1 or self.n_items < self.n_genres:
            raise ValueError("need more genres than background tastes + 1 and at least one item per genre")


def generate_long_range(cfg: LongRangeConfig) -> SynthLog:
    """Generate a long-range scenario (see :class:`LongRangeConfig`). ``SynthLog.planted`` marks the first
    event of every return of the planted interest (the long-range predictions; the last event of every
    user is one of them), ``reconsumed`` the events that repeat an earlier item of the user."""
    rng = np.random.default_rng(cfg.seed)
    g = cfg.n_genres
    perm = rng.permutation(cfg.n_items)
    genre_items = [perm[j::g] for j in range(g)]  # inside a genre: popularity rank = position
    item_genre = np.empty(cfg.n_items, dtype=np.int64)
    for j, members in enumerate(genre_items):
        item_genre[members] = j

    def zipf(genre: int, size: int) -> np.ndarray:
        members = genre_items[genre]
        w = 1.0 / np.arange(1, len(members) + 1) ** cfg.zipf_a
        return members[rng.choice(len(members), size=size, p=w / w.sum())]

    users, items, stamps, sessions, planted = [], [], [], [], []
    session_base = 0
    for user in range(cfg.n_users):
        order = rng.permutation(g)
        dormant, tastes, others = int(order[0]), order[1 : 1 + cfg.bg_tastes], order[1:]
        favourites = zipf(dormant, 50)
        favourites = np.unique(favourites)[: cfg.favourites] if len(np.unique(favourites)) else favourites[:1]
        n_gaps = cfg.returns + 1
        if cfg.scenario == "periodic":
            gaps = np.full(n_gaps, cfg.gap)
        else:
            lo, hi = round(cfg.gap * (1 - cfg.jitter)), round(cfg.gap * (1 + cfg.jitter))
            gaps = rng.integers(max(lo, 1), max(hi, 1) + 1, size=n_gaps)
        # segments: burst, (gap of background, burst) x returns, gap of background, the test event
        kinds: list[tuple[str, int]] = [("burst", cfg.burst)]
        for i, n in enumerate(gaps):
            kinds += [("bg", int(n)), ("burst", cfg.burst if i < cfg.returns else 1)]
        u_items, u_gaps, u_session, u_planted = [], [], [], []
        session = session_base
        for kind, n in kinds:
            if kind == "burst":
                if cfg.scenario != "reconsume":
                    drawn = zipf(dormant, n)
                elif not u_items:  # the first burst consumes every favourite once, so each return is a repeat
                    drawn = rng.permutation(favourites)
                    n = len(drawn)
                else:
                    drawn = rng.choice(favourites, size=n)
                u_items.append(drawn)
                first_gap = (
                    cfg.between_gap_median_s * rng.lognormal(0.0, 1.0)
                    if cfg.scenario == "periodic"
                    else max(cfg.pause_days * DAY * rng.lognormal(0.0, 0.25), 10 * DAY)
                )
                within = rng.lognormal(np.log(cfg.within_gap_median_s), 1.0, n)
                within[0] = first_gap
                u_gaps.append(within)
                session += 1
                u_session.append(np.full(n, session))
                mark = np.zeros(n, dtype=bool)
                mark[0] = True
                u_planted.append(mark)
                continue
            new = rng.random(n) < 1.0 / cfg.mean_session_len
            new[0] = True
            sid = np.cumsum(new) - 1
            n_sessions = int(sid[-1]) + 1
            intent = rng.random(n_sessions) < cfg.p_intent
            s_genre = np.where(intent, rng.choice(others, n_sessions), rng.choice(tastes, n_sessions))
            genre = s_genre[sid]
            drawn = np.empty(n, dtype=np.int64)
            for gg in np.unique(genre):
                at = genre == gg
                drawn[at] = zipf(int(gg), int(at.sum()))
            u_items.append(drawn)
            between = np.clip(rng.lognormal(np.log(cfg.between_gap_median_s), 1.0, n), *cfg.between_gap_clip_s)
            u_gaps.append(np.where(new, between, rng.lognormal(np.log(cfg.within_gap_median_s), 1.0, n)))
            u_session.append(session + 1 + sid)
            session += n_sessions
            u_planted.append(np.zeros(n, dtype=bool))
        gaps_s = np.concatenate(u_gaps)
        gaps_s[0] = 0.0
        start = cfg.start_time + rng.uniform(0, 30 * DAY)
        it = np.concatenate(u_items)
        users.append(np.full(len(it), user + 1))
        items.append(it)
        stamps.append(np.floor(start + np.cumsum(gaps_s)).astype(np.int64))
        sessions.append(np.concatenate(u_session))
        planted.append(np.concatenate(u_planted))
        session_base = session + 1
    items_all = np.concatenate(items)
    users_all = np.concatenate(users).astype(np.int64)
    reconsumed = np.zeros(len(items_all), dtype=bool)
    start = 0
    for u_items_arr in items:  # an item the user had before
        seen: set[int] = set()
        for k, item in enumerate(u_items_arr.tolist()):
            reconsumed[start + k] = item in seen
            seen.add(item)
        start += len(u_items_arr)
    return SynthLog(
        users=users_all,
        items=items_all + 1,
        timestamps=np.concatenate(stamps),
        session=np.concatenate(sessions).astype(np.int64),
        reconsumed=reconsumed,
        item_genre=item_genre,
        planted=np.concatenate(planted),
    )
