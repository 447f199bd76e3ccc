"""Model configuration: one dataclass, saved as JSON next to the weights."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch

from hytrec.model.vocab import FIRST_ITEM_ROW

Variant = Literal["hytrec", "hytrec-notime", "tadn-only", "recent-softmax", "hytrec-intent", "hytrec-hybrid"]
VARIANTS: tuple[str, ...] = ("hytrec", "hytrec-notime", "tadn-only", "recent-softmax", "hytrec-intent", "hytrec-hybrid")
STATE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True)
class HyTRecConfig:
    """Sizes and switches of the hybrid model (docs/model.md has the equations they size).

    ``variant`` picks the ablation: ``hytrec`` (both branches, time-aware TADN), ``hytrec-notime``
    (TADN without the time terms = Gated DeltaNet), ``tadn-only`` (long branch alone) and
    ``recent-softmax`` (short branch alone, no memory token). ``hytrec-intent`` (docs/long_history.md): the
    short branch's output at the request time reads every TADN layer's state, S·q, instead of attending to
    the summary token fixed at the last event. ``hytrec-hybrid``: the long branch is ``n_long`` TADN blocks
    then one sliding-window softmax block over the last ``long_window`` hidden states, [TADN x n_long, softmax].
    """

    n_items: int
    variant: Variant = "hytrec"
    d_model: int = 64
    n_heads: int = 2  # TADN heads; d_k = d_v = d_model // n_heads
    n_long: int = 2  # TADN blocks in the long branch
    window: int = 64  # K: events in the short branch's window and the ring buffer
    short_heads: int = 2
    ffn_mult: int = 4
    chunk_size: int = 64
    tau: float = 60.0  # seconds; phi(Delta) = log1p(Delta / tau)
    age_buckets: int = 64  # log-spaced buckets of an event's age in the short branch
    age_bucket_scale: float = 4.0  # bucket = floor(scale * phi(age))
    dropout: float = 0.2
    state_dtype: str = "float32"  # storage dtype of the TADN state: float32 | float16 | bfloat16
    long_window: int = 64  # hytrec-hybrid: W, hidden states the long branch's softmax block attends over
    slow_heads: int = 0  # TADN heads per layer (the last ones) whose decay is floored: see slow_half_life
    slow_half_life: float = 1000.0  # events: a slow head's state halves at most this often (its log-decay floor)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.d_model % self.n_heads or self.d_model % self.short_heads:
            raise ValueError("d_model must be divisible by n_heads and short_heads")
        if self.state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype must be one of {tuple(STATE_DTYPES)}")
        if self.n_items < 1 or self.window < 1 or self.chunk_size < 1 or self.long_window < 1:
            raise ValueError("n_items, window, chunk_size and long_window must be positive")
        if not 0 <= self.slow_heads <= self.n_heads or self.slow_half_life <= 0:
            raise ValueError("slow_heads must lie in [0, n_heads] and slow_half_life be positive")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_rows(self) -> int:
        """Rows of the item-embedding table: padding, unknown, then the catalogue."""
        return self.n_items + FIRST_ITEM_ROW

    @property
    def uses_long(self) -> bool:
        return self.variant != "recent-softmax"

    @property
    def uses_short(self) -> bool:
        return self.variant != "tadn-only"

    @property
    def reads_state(self) -> bool:
        """The short branch's intent reads each TADN layer's state at request time (``hytrec-intent``)."""
        return self.variant == "hytrec-intent"

    @property
    def window_layers(self) -> int:
        """Sliding-window softmax blocks after the TADN blocks in the long branch (``hytrec-hybrid``: 1)."""
        return 1 if self.variant == "hytrec-hybrid" else 0

    @property
    def memory_token(self) -> bool:
        """The short branch attends to the long summary as an extra token (``hytrec``, ``hytrec-notime``)."""
        return self.uses_long and self.uses_short and not self.reads_state

    @property
    def time_terms(self) -> bool:
        return self.variant != "hytrec-notime"

    @property
    def storage_dtype(self) -> torch.dtype:
        return STATE_DTYPES[self.state_dtype]

    def to_dict(self) -> dict[str, Any]:
        """The config as saved; without slow heads their two keys are left out, so such a checkpoint's
        config text, and with it its version, is what it was before the option existed."""
        data = dataclasses.asdict(self)
        if not self.slow_heads:
            del data["slow_heads"], data["slow_half_life"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HyTRecConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        return cls(**data)
