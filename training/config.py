"""Training configuration: the one place its fields, defaults and help text are written.

``hytrec train`` builds one option per field from this dataclass (:func:`hytrec.training.commands.train`), so
adding a field adds an option. The defaults are the recipe of docs/results.md (the committed ML-1M
checkpoints' ``meta``; ``tests/test_train_cli.py`` checks both). This module imports neither torch nor
numpy, so the CLI can read it while ``hytrec --help`` stays fast.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any


class ModelType(StrEnum):
    """The HyTRec variants of the ablation and the SASRec+ baseline (``model.checkpoint.MODEL_TYPES``)."""

    HYTREC = "hytrec"
    HYTREC_NOTIME = "hytrec-notime"
    TADN_ONLY = "tadn-only"
    RECENT_SOFTMAX = "recent-softmax"
    HYTREC_INTENT = "hytrec-intent"
    HYTREC_HYBRID = "hytrec-hybrid"
    SASREC = "sasrec"


class Loss(StrEnum):
    FULL = "full"
    SAMPLED = "sampled"


class StateDtype(StrEnum):
    """Storage dtypes of a serving state (``model.config.STATE_DTYPES``)."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"


class Schedule(StrEnum):
    """Learning-rate schedule after the linear warm-up (:func:`hytrec.training.optim.lr_factor`)."""

    CONSTANT = "constant"
    COSINE = "cosine"


class DecayRule(StrEnum):
    """Which parameters AdamW's weight decay reaches (:func:`hytrec.training.optim.param_groups`)."""

    MATRICES = "matrices"
    ALL = "all"


class Device(StrEnum):
    CPU = "cpu"
    CUDA = "cuda"


class Precision(StrEnum):
    FP32 = "fp32"
    BF16 = "bf16"


class Kernel(StrEnum):
    """The chunked delta rule's implementation (:mod:`hytrec.model.tadn.dispatch`)."""

    AUTO = "auto"
    TORCH = "torch"
    FLA = "fla"


SASREC_MAX_LEN = 200  # SASRec+ reads the latest 200 events unless told otherwise; HyTRec reads them all


def run_tie_seed(directory: Path) -> int | None:
    """The tie seed a run directory (or checkpoint copied from one) was trained with, from its
    ``train_config.json``; None when it has none (file order), so its evaluation orders ties the same way."""
    path = directory / "train_config.json"
    return json.loads(path.read_text()).get("tie_seed") if path.exists() else None


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass
class TrainConfig:
    """Everything a training run depends on besides its data file (written to ``train_config.json``).

    A field's ``metadata["help"]`` is its ``hytrec train`` help text; ``metadata["cli"] = False`` keeps a
    field off the command line (Python API only).
    """

    model_type: ModelType = field(
        default=ModelType.HYTREC,
        metadata=_help(
            "hytrec (both branches), hytrec-notime / tadn-only / recent-softmax (ablations), hytrec-intent (the "
            "short branch reads each TADN state at request time), hytrec-hybrid (n-layers TADN blocks + one sliding-"
            "window softmax block in the long branch; docs/long_history.md), sasrec."
        ),
    )
    epochs: int = field(
        default=40,
        metadata=_help("Maximum epochs (docs/results.md: 40; its ML-1M HyTRec rows 29, for CPU time)."),
    )
    patience: int = field(default=5, metadata=_help("Stop after this many epochs without a better val NDCG@10."))
    lr: float = field(default=2e-3, metadata=_help("AdamW peak learning rate."))
    weight_decay: float = field(default=0.01, metadata=_help("AdamW weight decay (of the parameters --decay names)."))
    decay: DecayRule = field(
        default=DecayRule.MATRICES,
        metadata=_help(
            "matrices: decay only nn.Linear weights, none on biases, norms, embeddings, gates and time parameters "
            "| all: every parameter (one group: how docs/results.md's runs were trained)."
        ),
    )
    grad_clip: float = field(default=1.0, metadata=_help("Clip the global gradient norm to this (0: no clipping)."))
    schedule: Schedule = field(
        default=Schedule.CONSTANT,
        metadata=_help("After warm-up: constant, or cosine down to min-lr-ratio x lr at the last epoch's end."),
    )
    warmup_steps: int = field(default=0, metadata=_help("Optimiser steps of linear learning-rate warm-up."))
    min_lr_ratio: float = field(default=0.1, metadata=_help("Cosine schedule: final learning rate / lr."))
    batch_tokens: int = field(
        default=8192, metadata=_help("Events per batch (B x L); a longer history is a batch of its own.")
    )
    max_len: int | None = field(
        default=None,
        metadata=_help(f"Latest events a model reads (default: all for HyTRec, {SASREC_MAX_LEN} for SASRec+)."),
    )
    d_model: int = field(default=64, metadata=_help("Model width."))
    n_layers: int = field(default=2, metadata=_help("TADN blocks (HyTRec) or transformer blocks (SASRec+)."))
    n_heads: int = field(default=2, metadata=_help("Attention / TADN heads."))
    window: int = field(default=64, metadata=_help("K: events of the short branch and of the serving ring buffer."))
    slow_heads: int = field(
        default=0,
        metadata=_help("HyTRec: TADN heads per layer whose state halves at most every --slow-half-life events."),
    )
    slow_half_life: float = field(
        default=1000.0, metadata=_help("HyTRec: the slow heads' half-life floor, in events (their decay floor).")
    )
    chunk_size: int = field(default=64, metadata=_help("TADN chunk length of the parallel (training) form."))
    dropout: float = field(default=0.2, metadata=_help("Dropout."))
    state_dtype: StateDtype = field(
        default=StateDtype.FLOAT32, metadata=_help("Storage dtype of the serving state (HyTRec).")
    )
    loss: Loss = field(
        default=Loss.FULL,
        metadata=_help("full softmax, or sampled (logQ-corrected, shared negatives; for large catalogues)."),
    )
    negatives: int = field(default=1024, metadata=_help("Negatives per batch of the sampled softmax."))
    seed: int = field(default=0, metadata=_help("Random seed (weights, batch order, dropout)."))
    tie_seed: int | None = field(
        default=None,
        metadata=_help(
            "Order a user's events with equal timestamps by a random permutation drawn from this seed, in "
            "training and in the run's evaluation (default: file order)."
        ),
    )
    threads: int = field(
        default=0,
        metadata=_help("Torch intra-op threads (0: torch's default; docs/results.md ran 1 per run, 2 at a time)."),
    )
    device: Device = field(
        default=Device.CPU,
        metadata=_help("cpu or cuda (under torchrun: each process the GPU of its LOCAL_RANK)."),
    )
    precision: Precision = field(
        default=Precision.FP32,
        metadata=_help("bf16: autocast the projections and FFNs; the delta-rule recurrence and the loss stay fp32."),
    )
    kernel: Kernel = field(
        default=Kernel.AUTO,
        metadata=_help(
            "Chunked delta rule: auto (fla-core's Triton kernel on CUDA when installed and it passes its parity "
            "check, else PyTorch), torch, or fla."
        ),
    )
    checkpoint_every: int = field(
        default=0,
        metadata=_help("Also write the resumable train state every N optimiser steps (0: at each epoch's end only)."),
    )
    model_overrides: dict[str, Any] = field(
        default_factory=dict,
        metadata=_help("Extra model-config keys, over the ones above (tests and benchmarks).", cli=False),
    )

    def __post_init__(self) -> None:
        # Enum constructors turn a plain string (Python callers, JSON) into its member or raise ValueError.
        self.model_type = ModelType(self.model_type)
        self.loss = Loss(self.loss)
        self.state_dtype = StateDtype(self.state_dtype)
        self.decay, self.schedule = DecayRule(self.decay), Schedule(self.schedule)
        self.device, self.precision, self.kernel = Device(self.device), Precision(self.precision), Kernel(self.kernel)
        for name in ("grad_clip", "weight_decay", "warmup_steps", "checkpoint_every", "min_lr_ratio"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.model_type is ModelType.SASREC and self.max_len is None:
            self.max_len = SASREC_MAX_LEN
        if self.slow_heads and self.model_type in (ModelType.SASREC, ModelType.RECENT_SOFTMAX):
            raise ValueError(f"slow_heads needs a model with TADN heads, not {self.model_type.value}")

    def model_config(self, n_items: int) -> dict[str, Any]:
        """Keyword arguments of the model's config (``HyTRecConfig`` / ``SASRecConfig``)."""
        common = {"n_items": n_items, "d_model": self.d_model, "dropout": self.dropout}
        if self.model_type == ModelType.SASREC:
            cfg = {**common, "n_layers": self.n_layers, "n_heads": self.n_heads, "max_len": self.max_len}
        else:
            cfg = {
                **common,
                "n_long": self.n_layers,
                "n_heads": self.n_heads,
                "short_heads": self.n_heads,
                "window": self.window,
                "chunk_size": self.chunk_size,
                "state_dtype": str(self.state_dtype),
                **({"slow_heads": self.slow_heads, "slow_half_life": self.slow_half_life} if self.slow_heads else {}),
            }
        return {**cfg, **self.model_overrides}
