"""Every row of the case table (``cases.py``) through the real CLI or the real HTTP service.

An error case must exit with status 2 and one ``error:`` line naming the problem, without a traceback; an accepted
case must exit 0. In both, every file that existed before the command keeps its bytes, no temporary file is left
behind and no pickle ran code (its marker file is absent).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from typer.testing import CliRunner

from prerank.cli import app
from prerank.serve.app import create_app, serve_in_thread
from prerank.serve.scorer import Scorer

from .cases import AUTH, BODY, CASES, HTTP_CASES, MAX_BODY, MAX_CANDIDATES, Case, HttpCase, Workspace
from .conftest import snapshot

runner = CliRunner()


def _no_server(*_args: object, **_kwargs: object) -> None:
    raise AssertionError("the server would have started: the case was not refused")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case: Case, workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    if case.needs_non_root and os.geteuid() == 0:
        pytest.skip("root may write into a read-only folder")
    monkeypatch.setattr(uvicorn, "run", _no_server)
    monkeypatch.delenv("PRERANK_TOKEN", raising=False)
    monkeypatch.delenv("PRERANK_DEBUG", raising=False)
    argv = case.argv(workspace)
    before = snapshot(workspace.root)
    res = runner.invoke(app, argv)
    text = " ".join(res.output.split())  # rich wraps long lines
    assert "Traceback" not in text, text
    if case.ok:
        assert res.exit_code == 0, text
    else:
        assert res.exit_code == 2 and isinstance(res.exception, SystemExit), (res.exit_code, repr(res.exception), text)
        assert text.count("error:") == 1, text  # progress lines may come first
        assert case.match in text[text.index("error:") :], text
    after = snapshot(workspace.root)
    changed = [p for p, h in before.items() if after.get(p) != h]
    assert not changed, f"files damaged: {changed}"
    leftovers = [p for p in after if p not in before and Path(p).name.startswith(".")]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    assert not workspace.marker.exists(), "a pickle ran code while loading"


def test_cases_have_unique_ids_and_cover_the_issue() -> None:
    ids = [c.id for c in (*CASES, *HTTP_CASES)]
    assert len(ids) == len(set(ids))
    assert len(CASES) + len(HTTP_CASES) >= 50
    assert {c.area for c in CASES} == {"data", "training", "checkpoint", "artifact"}
    assert all(c.match for c in CASES if not c.ok)


@pytest.fixture(scope="module")
def service(base: Path) -> Iterator[httpx.Client]:
    scorer = Scorer.load(base / "art", runtime="torch", max_candidates=MAX_CANDIDATES)
    app_ = create_app(scorer, max_body_bytes=MAX_BODY, token="secret")
    with serve_in_thread(app_) as url, httpx.Client(base_url=url) as client:
        yield client


@pytest.mark.parametrize("case", HTTP_CASES, ids=[c.id for c in HTTP_CASES])
def test_http_case(case: HttpCase, service: httpx.Client) -> None:
    r = service.request(**case.request)
    assert r.status_code == case.status, r.text
    detail = r.json()["detail"]
    assert detail and all(e["message"] for e in detail)
    if case.field is not None:
        assert case.field in [e["field"] for e in detail], detail
    # the service keeps serving after every refusal
    assert service.post("/score", json=BODY, headers=AUTH).status_code == 200
