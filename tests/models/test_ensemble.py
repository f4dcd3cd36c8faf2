"""The ensemble averages its members' logits; each member is an independent copy of a registered model."""

from __future__ import annotations

import pytest
import torch

from prerank.data.batch import Batch
from prerank.models.base import ConfigError
from prerank.models.ensemble import Ensemble, EnsembleConfig
from prerank.models.ranker import Ranker
from prerank.schema import Schema


def test_logit_is_the_mean_of_the_members_logits(schema: Schema, batch: Batch) -> None:
    torch.manual_seed(0)
    model = Ensemble(schema, EnsembleConfig(members=3, model_config={"hidden": [8], "wide": True})).eval()
    assert len(model.members) == 3 and all(isinstance(m, Ranker) and m.config.wide for m in model.members)
    with torch.no_grad():
        each = torch.stack([m(batch) for m in model.members])
        assert not torch.allclose(each[0], each[1])  # members start apart
        torch.testing.assert_close(model(batch), each.mean(0))
    assert set(model.encode_item(batch)) == {f"{k}/{key}" for k in range(3) for key in ("fields", "wide:i")}


def test_bad_config(schema: Schema) -> None:
    with pytest.raises(ConfigError, match="at least one member"):
        Ensemble(schema, EnsembleConfig(members=0))
    with pytest.raises(ConfigError, match="cannot be ensembles"):
        Ensemble(schema, EnsembleConfig(model="ensemble"))
    with pytest.raises(ConfigError, match="unknown model"):
        Ensemble(schema, EnsembleConfig(model="nope"))
