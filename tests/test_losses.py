"""The blocked full-softmax cross-entropy and the age-bias lookup equal their plain PyTorch definitions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hytrec.model.short_branch import small_table_lookup
from hytrec.training.losses import full_softmax_cross_entropy


@pytest.mark.parametrize("block_rows", [1, 7, 64, 1000])
def test_blocked_cross_entropy_matches_plain_value_and_gradients(block_rows: int) -> None:
    gen = torch.Generator().manual_seed(0)
    user = torch.randn(97, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    items = torch.randn(301, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 301, (97,), generator=gen)
    ref = F.cross_entropy(user @ items.T, targets)
    ref_grads = torch.autograd.grad(ref * 3.0, (user, items))
    got = full_softmax_cross_entropy(user, items, targets, block_rows=block_rows)
    got_grads = torch.autograd.grad(got * 3.0, (user, items))  # a non-unit upstream gradient
    assert torch.allclose(got, ref, rtol=1e-12, atol=0)
    for g, r in zip(got_grads, ref_grads, strict=True):
        assert torch.allclose(g, r, rtol=1e-10, atol=1e-14)


def test_blocked_cross_entropy_survives_an_underflowing_target_probability() -> None:
    user = torch.tensor([[60.0, 0.0], [1.0, 0.0]], requires_grad=True)
    items = torch.tensor([[50.0, 0.0], [-50.0, 0.0], [0.0, 1.0]], requires_grad=True)
    targets = torch.tensor([1, 0])  # row 0: p(target) = exp(-6000) underflows to 0 in float32
    got = full_softmax_cross_entropy(user, items, targets)
    ref = F.cross_entropy(user.double() @ items.double().T, targets)
    assert torch.isfinite(got)
    assert torch.allclose(got.double(), ref, rtol=1e-5)
    got.backward()
    assert torch.isfinite(user.grad).all() and torch.isfinite(items.grad).all()


def test_blocked_cross_entropy_of_an_empty_batch_is_zero_with_zero_gradients() -> None:
    user = torch.zeros(0, 4, requires_grad=True)
    items = torch.randn(5, 4, requires_grad=True)
    loss = full_softmax_cross_entropy(user, items, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and items.grad.abs().sum() == 0


def test_small_table_lookup_matches_embedding_forward_and_backward() -> None:
    gen = torch.Generator().manual_seed(1)
    table = torch.randn(64, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 64, (4, 5, 6, 7), generator=gen)
    upstream = torch.randn(4, 5, 6, 7, 3, generator=gen, dtype=torch.float64)
    got = small_table_lookup(table, index)
    (got_grad,) = torch.autograd.grad(got, table, upstream)
    ref = F.embedding(index, table)
    (ref_grad,) = torch.autograd.grad(ref, table, upstream)
    assert torch.equal(got, ref)
    assert torch.allclose(got_grad, ref_grad, rtol=1e-12, atol=1e-12)
