"""The gated delta rule with time-aware gates (TADN), one function in several forms.

- :mod:`hytrec.model.tadn.gate`      the time feature and the time-aware log-decay / write-strength gates;
- :mod:`hytrec.model.tadn.chunk`     the chunked parallel form (WY / UT transform), used for training;
- :mod:`hytrec.model.tadn.dispatch`  the one dispatch point of the chunked form (fp32; PyTorch or fla-core's
  CUDA kernel): the ``chunk_gated_delta_rule*`` exported here are its functions;
- :mod:`hytrec.model.tadn.recurrent` one step for many users at once, used for serving;
- :mod:`hytrec.model.tadn.naive`     the literal step-by-step equation, kept as the reference for tests.

All forms share one layout: ``q, k`` (B, H, L, d_k), ``v`` (B, H, L, d_v), ``g`` (log-decay) and
``beta`` (B, H, L); the state ``S`` is (B, H, d_v, d_k) and the read-out is ``o_t = S_t q_t`` with

    S_t = exp(g_t) * S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T.
"""

from hytrec.model.tadn.dispatch import chunk_gated_delta_rule, chunk_gated_delta_rule_with_read, set_kernel
from hytrec.model.tadn.gate import time_deltas, time_feature
from hytrec.model.tadn.naive import naive_gated_delta_rule, naive_gated_delta_rule_with_read
from hytrec.model.tadn.recurrent import recurrent_gated_delta_step

__all__ = [
    "chunk_gated_delta_rule",
    "chunk_gated_delta_rule_with_read",
    "naive_gated_delta_rule",
    "naive_gated_delta_rule_with_read",
    "recurrent_gated_delta_step",
    "set_kernel",
    "time_deltas",
    "time_feature",
]
