"""The web client's files as the app serves them: the page at /, its modules under /web/, with the headers that
keep the page to this server (a small app of web.ROUTES: the routes exactly as app.py mounts them)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from blink.gateway import web


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(Starlette(routes=web.ROUTES)) as c:
        yield c


def test_the_page_is_served_at_the_root_with_a_strict_policy(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy and "unsafe" not in policy
    assert page.headers["x-content-type-options"] == "nosniff"


def test_everything_the_page_loads_is_served_from_this_server(client: TestClient) -> None:
    """Every file index.html and the modules reference is here (a missing one fails the page silently)."""
    html = client.get("/").text
    wanted = set(re.findall(r'(?:src|href)="(/web/[^"]+)"', html))
    for module in [w for w in wanted if w.endswith(".js")]:
        source = client.get(module).text
        wanted |= {f"/web/{name}" for name in re.findall(r'from "\./([^"]+)"', source)}
    assert {"/web/app.js", "/web/style.css", "/web/client.js"} <= wanted
    for path in wanted:
        got = client.get(path)
        assert got.status_code == 200, path
        kind = "javascript" if path.endswith(".js") else "css"
        assert kind in got.headers["content-type"] and "default-src 'none'" in got.headers["content-security-policy"]
    assert not re.search(r'(?:src|href)="(?:https?:)?//', html)  # nothing from another host


def test_a_missing_file_is_404_and_paths_stay_inside_the_folder(client: TestClient) -> None:
    assert client.get("/web/nothing.js").status_code == 404
    assert client.get("/web/../gateway/web.py").status_code == 404
    assert client.get("/web/%2e%2e/gateway/web.py").status_code == 404
