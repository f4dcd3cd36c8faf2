"""Every registered model keeps the contract of DESIGN.md: forward == score(encode_user, encode_item)."""

from __future__ import annotations

import pytest
import torch

from prerank.data.batch import Batch
from prerank.models.base import State
from prerank.models.registry import MODELS, build_model
from prerank.schema import Schema


def _one_user_many_items(batch: Batch, schema: Schema) -> Batch:
    """Copy row 0's user/context features onto every row: one request, N candidates."""
    user_side = {f.name for f in schema.tower("user", "context")}
    feats = {k: (v[:1].expand_as(v).clone() if k in user_side else v) for k, v in batch.features.items()}
    return Batch(features=feats, label=batch.label)


def _gather(state: State, index: torch.Tensor) -> State:
    return {k: v[index] for k, v in state.items()}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_equals_score_of_encodings(name: str, schema: Schema, batch: Batch) -> None:
    model = build_model(name, schema).eval()
    with torch.no_grad():
        full = model(batch)
        split = model.score(model.encode_user(batch), model.encode_item(batch), batch)
    assert full.shape == (len(batch),)
    assert torch.isfinite(full).all()
    torch.testing.assert_close(full, split)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cached_item_states_score_like_raw_features(name: str, schema: Schema, batch: Batch) -> None:
    """One user against N candidates: a shuffled item cache gathered by id (``score``) equals the raw forward."""
    model = build_model(name, schema).eval()
    request = _one_user_many_items(batch, schema)
    n = len(request)
    with torch.no_grad():
        raw = model(request)
        perm = torch.randperm(n)
        cache = model.encode_item(request.select(perm))  # the cache holds items in another order
        where = torch.empty_like(perm)
        where[perm] = torch.arange(n)
        user = model.encode_user(request.select(slice(0, 1)))  # one user state, broadcast over N
        cached = model.score(user, _gather(cache, where), request)
    torch.testing.assert_close(raw, cached, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_gradients_reach_every_trainable_parameter(name: str, schema: Schema, batch: Batch) -> None:
    model = build_model(name, schema).train()
    user, item = model.encode_user(batch), model.encode_item(batch)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model.score(user, item, batch), batch.label)
    aux = model.auxiliary_loss(batch, user, item)
    if aux is not None:
        loss = loss + aux
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not dead, f"parameters without gradient: {dead}"
