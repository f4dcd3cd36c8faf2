"""The HTTP service, driven over real HTTP: a uvicorn server on a free loopback port, httpx as the client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_artifact import NUM_ITEMS, make_checkpoint, write_serve_data
from test_scorer import CANDIDATES, CROSS, USER

from prerank.serve.app import create_app, is_loopback, serve_in_thread
from prerank.serve.export import export
from prerank.serve.scorer import Scorer

BODY = {"user": USER, "candidates": CANDIDATES, "cross": CROSS}


@pytest.fixture(scope="module")
def scorer(tmp_path_factory: pytest.TempPathFactory) -> Scorer:
    root = tmp_path_factory.mktemp("http")
    export(make_checkpoint(root / "lr.pt", "lr"), write_serve_data(root / "data"), root / "art")
    return Scorer.load(root / "art", max_candidates=20)


@pytest.fixture(scope="module")
def client(scorer: Scorer) -> Iterator[httpx.Client]:
    with serve_in_thread(create_app(scorer, max_body_bytes=4096)) as url, httpx.Client(base_url=url) as c:
        yield c


def fields(response: httpx.Response) -> list[str]:
    return [e["field"] for e in response.json()["detail"]]


def test_health(client: httpx.Client) -> None:
    r = client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_metadata(client: httpx.Client, scorer: Scorer) -> None:
    meta = client.get("/metadata").json()
    assert meta["model"] == "lr"
    assert meta["weights_sha256"] == scorer.manifest["weights_sha256"]
    assert meta["num_items"] == NUM_ITEMS
    assert [f["name"] for f in meta["schema"]["features"]] == scorer.schema.names
    assert meta["max_candidates"] == 20 and meta["max_body_bytes"] == 4096


def test_score_matches_the_scorer(client: httpx.Client, scorer: Scorer) -> None:
    r = client.post("/score", json={**BODY, "k": 3})
    assert r.status_code == 200, r.text
    expected = scorer.score(USER, CANDIDATES, cross=CROSS, k=3)
    assert r.json() == {"ids": expected.ids, "scores": pytest.approx(expected.scores), "skipped": []}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**BODY, "candidates": [1, "x"]}, "candidates.1"),
        ({**BODY, "candidates": [1, True]}, "candidates.1"),
        ({k: v for k, v in BODY.items() if k != "user"}, "user"),
        ({**BODY, "user": {**USER, "age": 99}}, "user.age"),
        ({**BODY, "user": {**USER, "user_ctr": None}}, "user.user_ctr"),
        ({**BODY, "candidates": []}, "candidates"),
        ({**BODY, "candidates": [5, 39], "cross": {k: v[:2] for k, v in CROSS.items()}}, "candidates"),
        ({**BODY, "cross": {"user_cat_affinity": [0.5] * 5}}, "cross"),
        ({**BODY, "k": -1}, "k"),
        ({**BODY, "extra": 1}, "extra"),
    ],
)
def test_malformed_requests_get_422_naming_the_field(client: httpx.Client, body: dict, field: str) -> None:
    r = client.post("/score", json=body)
    assert r.status_code == 422, r.text
    assert field in fields(r)
    assert all(e["message"] for e in r.json()["detail"])


def test_invalid_json_gets_422(client: httpx.Client) -> None:
    r = client.post("/score", content=b'{"user": ', headers={"content-type": "application/json"})
    assert r.status_code == 422 and fields(r) == ["body"]


def test_too_many_candidates_get_413(client: httpx.Client) -> None:
    r = client.post("/score", json={**BODY, "candidates": list(range(1, 22)), "cross": None})
    assert r.status_code == 413 and fields(r) == ["candidates"]


def test_oversized_body_gets_413(client: httpx.Client) -> None:
    r = client.post("/score", json={**BODY, "padding": "x" * 5000})
    assert r.status_code == 413 and fields(r) == ["body"]


def test_oversized_chunked_body_without_length_gets_413(client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(50):
            yield b" " * 200

    r = client.post("/score", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert r.status_code == 413 and fields(r) == ["body"]


def test_server_keeps_serving_after_errors(client: httpx.Client) -> None:
    client.post("/score", json={**BODY, "candidates": "nope"})
    assert client.post("/score", json=BODY).status_code == 200


def test_skip_mode_reports_skipped(scorer: Scorer) -> None:
    skipping = Scorer(scorer.runtime, scorer.cache, scorer.schema, unknown_items="skip", manifest=scorer.manifest)
    with serve_in_thread(create_app(skipping)) as url:
        r = httpx.post(f"{url}/score", json={**BODY, "candidates": [5, 39, 1, 0, 7]})
    assert r.status_code == 200 and r.json()["skipped"] == [39, 0] and r.json()["ids"] == [5, 1, 7]


def test_is_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.com")


def test_serve_binds_loopback_by_default(scorer: Scorer) -> None:
    with serve_in_thread(create_app(scorer)) as url:
        assert url.startswith("http://127.0.0.1:")


def test_cli_serve_refuses_a_broken_artifact(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    import prerank.cli.serve  # noqa: F401
    from prerank.cli import app

    r = CliRunner().invoke(app, ["serve", str(tmp_path / "missing")])
    assert r.exit_code != 0 and "does not exist" in " ".join(r.output.split())
