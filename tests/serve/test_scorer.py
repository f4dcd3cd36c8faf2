"""The online scorer: input validation, unknown items, top-k order, threads."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_artifact import NUM_ITEMS, make_checkpoint, write_serve_data

from prerank.serve.export import export
from prerank.serve.scorer import RequestTooLarge, Scorer, ScoringError

USER = {"user_id": 3, "age": 1, "user_ctr": 0.5, "hist_item_id": [4, 2, 9], "hour": 7}
CANDIDATES = [5, 1, 7, 12, 30]
CROSS = {"user_cat_affinity": [0.1, 0.9, 0.3, 0.0, 1.0], "user_cat_clicks": [1, 2, 0, 5, 3]}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scorer")
    data = write_serve_data(root / "data")
    out = {}
    for name in ("lr", "two_tower"):
        out[name] = root / f"art-{name}"
        export(make_checkpoint(root / f"{name}.pt", name), data, out[name])
    return out


@pytest.fixture
def lr(artifacts: dict[str, Path]) -> Scorer:
    return Scorer.load(artifacts["lr"], max_candidates=10)


def test_scores_follow_request_order_and_top_k_is_sorted(lr: Scorer) -> None:
    full = lr.score(USER, CANDIDATES, cross=CROSS)
    assert full.ids == CANDIDATES and len(full.scores) == 5
    top = lr.score(USER, CANDIDATES, cross=CROSS, k=3)
    assert top.scores == sorted(top.scores, reverse=True)
    order = sorted(range(5), key=lambda i: -full.scores[i])[:3]
    assert top.ids == [CANDIDATES[i] for i in order]
    torch.testing.assert_close(torch.tensor(top.scores), torch.tensor([full.scores[i] for i in order]))
    assert lr.score(USER, CANDIDATES, cross=CROSS, k=50).ids == [
        CANDIDATES[i] for i in sorted(range(5), key=lambda i: -full.scores[i])
    ]


def test_cross_features_change_the_score(lr: Scorer) -> None:
    a = lr.score(USER, CANDIDATES, cross=CROSS).scores
    b = lr.score(USER, CANDIDATES, cross={**CROSS, "user_cat_clicks": [4, 4, 4, 4, 4]}).scores
    assert a != b


def test_unknown_items_fail_names_them(lr: Scorer) -> None:
    with pytest.raises(ScoringError, match=r"unknown item ids \[35, 0\]") as e:
        lr.score(USER, [5, 35, 0, 1], cross={k: v[:4] for k, v in CROSS.items()})
    assert e.value.field == "candidates"


def test_unknown_items_skip_scores_the_rest(artifacts: dict[str, Path]) -> None:
    scorer = Scorer.load(artifacts["lr"], unknown_items="skip")
    ids = [5, 35, 1, 10_000]
    cross = {"user_cat_affinity": [0.1, 0.2, 0.9, 0.4], "user_cat_clicks": [1, 3, 2, 1]}
    result = scorer.score(USER, ids, cross=cross)
    assert result.skipped == [35, 10_000] and result.ids == [5, 1]
    alone = scorer.score(USER, [5, 1], cross={k: [v[0], v[2]] for k, v in cross.items()})
    assert result.scores == pytest.approx(alone.scores)
    assert scorer.score(USER, [36, 37], cross={k: v[:2] for k, v in cross.items()}).ids == []


def test_two_tower_needs_no_cross_features(artifacts: dict[str, Path]) -> None:
    scorer = Scorer.load(artifacts["two_tower"])
    assert scorer.required_cross == ()
    assert len(scorer.score(USER, CANDIDATES).scores) == 5


def test_cross_features_a_model_does_not_read_are_only_length_checked(artifacts: dict[str, Path]) -> None:
    scorer = Scorer.load(artifacts["two_tower"])
    unread = {"user_cat_affinity": ["any"] * 5, "user_cat_clicks": [None] * 5}
    assert scorer.score(USER, CANDIDATES, cross=unread).scores == scorer.score(USER, CANDIDATES).scores
    with pytest.raises(ScoringError, match="one value per candidate") as e:
        scorer.score(USER, CANDIDATES, cross={"user_cat_clicks": [1, 2]})
    assert e.value.field == "cross.user_cat_clicks"


def test_threads_setting(artifacts: dict[str, Path]) -> None:
    before = torch.get_num_threads()
    try:
        Scorer.load(artifacts["two_tower"], threads=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="threads"):
        Scorer.load(artifacts["two_tower"], threads=0)


@pytest.mark.parametrize(
    ("user", "candidates", "cross", "k", "field", "message"),
    [
        ({k: v for k, v in USER.items() if k != "age"}, CANDIDATES, CROSS, None, "user", r"missing features \['age'\]"),
        ({**USER, "age": "1"}, CANDIDATES, CROSS, None, "user.age", "integer id"),
        ({**USER, "age": True}, CANDIDATES, CROSS, None, "user.age", "integer id"),
        ({**USER, "age": 1.0}, CANDIDATES, CROSS, None, "user.age", "integer id"),
        ({**USER, "age": 5}, CANDIDATES, CROSS, None, "user.age", r"outside the vocabulary \[0, 5\)"),
        ({**USER, "user_id": -1}, CANDIDATES, CROSS, None, "user.user_id", "outside the vocabulary"),
        ({**USER, "user_id": 2**70}, CANDIDATES, CROSS, None, "user.user_id", "outside the vocabulary"),
        ({**USER, "hist_item_id": [2**70]}, CANDIDATES, CROSS, None, "user.hist_item_id", "integer ids"),
        (USER, [2**64 - 1], CROSS, None, "candidates", "too large"),
        ({**USER, "user_ctr": math.nan}, CANDIDATES, CROSS, None, "user.user_ctr", "finite number"),
        ({**USER, "user_ctr": "high"}, CANDIDATES, CROSS, None, "user.user_ctr", "finite number"),
        ({**USER, "hist_item_id": [1, 40]}, CANDIDATES, CROSS, None, "user.hist_item_id", "outside the vocabulary"),
        ({**USER, "hist_item_id": 4}, CANDIDATES, CROSS, None, "user.hist_item_id", "list of integer ids"),
        ({**USER, "item_ctr": 0.3}, CANDIDATES, CROSS, None, "user.item_ctr", "the item tower"),
        ({**USER, "agee": 1}, CANDIDATES, CROSS, None, "user.agee", "not in the schema"),
        ("alice", CANDIDATES, CROSS, None, "user", "must be an object"),
        (USER, [], CROSS, None, "candidates", "empty"),
        (USER, [1, 2.5], CROSS, None, "candidates", "integer item ids"),
        (USER, [1, -2], CROSS, None, "candidates", ">= 0"),
        (USER, "12", CROSS, None, "candidates", "list of item ids"),
        (USER, CANDIDATES, None, None, "cross", "missing cross features"),
        (USER, CANDIDATES, {"user_cat_affinity": CROSS["user_cat_affinity"]}, None, "cross", "user_cat_clicks"),
        (USER, CANDIDATES, {**CROSS, "user_cat_clicks": [1, 2]}, None, "cross.user_cat_clicks", "one value per"),
        (USER, CANDIDATES, {**CROSS, "user_cat_clicks": [1, 2, 3, 4, 6]}, None, "cross.user_cat_clicks", "vocabulary"),
        (
            USER,
            CANDIDATES,
            {**CROSS, "user_cat_affinity": [0, 1, math.inf, 0, 0]},
            None,
            "cross.user_cat_affinity",
            "finite",
        ),
        (USER, CANDIDATES, {**CROSS, "user_cat_affinity": [True] * 5}, None, "cross.user_cat_affinity", "numbers"),
        (USER, CANDIDATES, {**CROSS, "bogus": [1] * 5}, None, "cross.bogus", "not a cross feature"),
        (USER, CANDIDATES, CROSS, 0, "k", ">= 1"),
        (USER, CANDIDATES, CROSS, 2.0, "k", ">= 1"),
    ],
)
def test_invalid_requests_name_the_field(
    lr: Scorer, user: object, candidates: object, cross: object, k: object, field: str, message: str
) -> None:
    with pytest.raises(ScoringError, match=message) as e:
        lr.score(user, candidates, cross=cross, k=k)  # type: ignore[arg-type]
    assert e.value.field == field
    assert not isinstance(e.value, RequestTooLarge)


def test_too_many_candidates(lr: Scorer) -> None:
    with pytest.raises(RequestTooLarge, match="limit of 10") as e:
        lr.score(USER, list(range(1, 12)), cross={k: [v[0]] * 11 for k, v in CROSS.items()})
    assert e.value.field == "candidates"


def test_unread_user_features_may_be_omitted_and_long_sequences_keep_the_latest(artifacts: dict[str, Path]) -> None:
    scorer = Scorer.load(artifacts["lr"])
    batch = scorer.user_batch({**USER, "hist_item_id": list(range(1, 10))})
    assert batch.features["hist_item_id"].tolist() == [[4, 5, 6, 7, 8, 9]]
    scorer.required_user = ("user_id",)
    assert scorer.user_batch({"user_id": 2}).features["age"].tolist() == [0]


def test_scorer_options_are_validated(artifacts: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="unknown_items"):
        Scorer.load(artifacts["lr"], unknown_items="drop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_candidates"):
        Scorer.load(artifacts["lr"], max_candidates=0)
    assert Scorer.load(artifacts["lr"]).metadata()["num_items"] == NUM_ITEMS
