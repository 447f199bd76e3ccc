"""WindowAttentionBlock: the blockwise parallel form equals ``attend`` (serving's per-event function) on
every window, at every real position, for lengths that are and are not multiples of W."""

from __future__ import annotations

import pytest
import torch

from hytrec.model.layers import WindowAttentionBlock


@pytest.mark.parametrize("length", [1, 37, 64, 130, 300])
def test_blockwise_forward_equals_attend_on_each_window(length: int) -> None:
    torch.manual_seed(length)
    w = 16
    block = WindowAttentionBlock(32, 2, w, 2, 0.0).eval()
    with torch.no_grad():
        block.pos_bias.normal_()  # zeros at init would hide an offset bug
    x = torch.randn(3, length, 32)
    valid = torch.ones(3, length, dtype=torch.bool)
    valid[1, (length * 3) // 4 + 1 :] = False  # a shorter history, right-padded
    prev = torch.randn(3, w, 32)
    prev_valid = torch.ones(3, w, dtype=torch.bool)
    prev_valid[0, : w // 3] = False  # fewer than W events before x
    prev_valid[2] = False  # nothing before x
    y = block(x, valid, prev, prev_valid)
    seq = torch.cat([prev, x], dim=1)[:, 1:]
    ok = torch.cat([prev_valid, valid], dim=1)[:, 1:]
    ref = block.attend(x, seq.unfold(1, w, 1).movedim(-1, -2), ok.unfold(1, w, 1))
    torch.testing.assert_close(y[valid], ref[valid], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(y).all()  # padding positions too: a query always sees itself


def test_blockwise_gradients_equal_the_per_window_ones() -> None:
    torch.manual_seed(0)
    w = 8
    block = WindowAttentionBlock(16, 2, w, 2, 0.0).train()
    x = torch.randn(2, 29, 16, requires_grad=True)
    valid = torch.ones(2, 29, dtype=torch.bool)
    valid[1, 12:] = False  # 17 padding positions, more than W
    prev, prev_valid = torch.zeros(2, w, 16), torch.zeros(2, w, dtype=torch.bool)
    (gx,) = torch.autograd.grad((block(x, valid, prev, prev_valid)[valid] ** 2).sum(), x)
    seq = torch.cat([prev, x], dim=1)[:, 1:]
    ok = torch.cat([prev_valid, valid], dim=1)[:, 1:]
    ref = block.attend(x, seq.unfold(1, w, 1).movedim(-1, -2), ok.unfold(1, w, 1))
    (gr,) = torch.autograd.grad((ref[valid] ** 2).sum(), x)
    torch.testing.assert_close(gx[valid], gr[valid], rtol=1e-4, atol=1e-5)
    # per window, a padding query W or more past the last event attends over nothing: NaN, which backward
    # spreads to the gradient (0 * NaN). The blockwise form keeps every gradient finite.
    assert torch.isnan(gr).any() and torch.isfinite(gx).all()
