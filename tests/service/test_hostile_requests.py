"""Hostile requests are refused as the client's fault (4xx problem documents), never answered 500 (issue 22)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.conftest import clip_files
from tests.service.live import multipart

PROBLEM_JSON = "application/problem+json"


def post_multipart(client: TestClient, path: str, body: bytes, boundary: str):
    return client.post(path, content=body, headers={"content-type": f"multipart/form-data; boundary={boundary}"})


def test_boundary_of_257_characters_is_422(client: TestClient) -> None:
    for length in (257, 1000, 60_000):
        boundary = "b" * length
        r = post_multipart(client, "/classify", multipart("file", "a.wav", b"abc", boundary), boundary)
        assert r.status_code == 422 and r.headers["content-type"] == PROBLEM_JSON, (length, r.text[:200])
        assert r.json()["code"] == "invalid_boundary"


def test_boundary_of_256_characters_still_parses(client: TestClient) -> None:
    boundary = "b" * 256
    r = post_multipart(client, "/classify", multipart("file", "a.wav", b"not audio", boundary), boundary)
    assert r.status_code == 422 and r.json()["code"] != "invalid_boundary"  # read, then refused as audio


def test_parts_without_names_and_10000_empty_parts_are_4xx(client: TestClient) -> None:
    nameless = b"--bb\r\nContent-Disposition: form-data\r\n\r\nxyz\r\n--bb\r\n\r\nabc\r\n--bb--\r\n"
    empty = b"".join(b"--bb\r\n\r\n\r\n" for _ in range(10_000)) + b"--bb--\r\n"
    for path in ("/classify", "/scenes/kitchen/enroll"):
        for body in (nameless, empty, b"--bb\r\ngarbage", b"--bb--\r\n"):
            r = post_multipart(client, path, body, "bb")
            assert 400 <= r.status_code < 500 and r.headers["content-type"] == PROBLEM_JSON, (path, r.text[:200])
    assert client.get("/scenes").json()["scenes"] == []


@pytest.mark.parametrize("name", ["a%0Ab", "a%0A", "%0A", "a%0Db", "a%00b", "a%09b", "a%1Fb", "a%7Fb"])
def test_scene_names_with_control_characters_are_422_in_every_route(client: TestClient, name: str) -> None:
    answers = [client.get(f"/scenes/{name}"), client.delete(f"/scenes/{name}"),
               client.patch(f"/scenes/{name}", json={"threshold": 0.5}),
               client.post(f"/scenes/{name}/enroll", files=clip_files()),
               client.post(f"/scenes/{name}/clips", files=clip_files(n=1))]
    for r in answers:
        assert r.status_code == 422 and r.json()["code"] == "invalid_scene_name", (r.request.method, r.text[:200])


def test_a_name_with_a_trailing_newline_never_addresses_the_scene_without_it(client: TestClient) -> None:
    assert client.post("/scenes/a/enroll", files=clip_files()).status_code == 201
    assert client.get("/scenes/a%0A").status_code == 422
    assert client.delete("/scenes/a%0A").status_code == 422
    assert 400 <= client.post("/scenes/a/clips%0A", files=clip_files(n=1, seed=50)).status_code < 500
    assert client.get("/scenes/a").json()["clips"] == 5


def test_every_status_of_a_json_body_route_is_in_its_openapi_document(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    deep = "[" * 20_000 + "]" * 20_000  # valid JSON, nested past the parser's recursion limit
    cases = [("post", "/keys", "/keys"), ("patch", "/scenes/kitchen", "/scenes/{name}")]
    for method, path, template in cases:
        for body in (deep, '{"name": ' * 5000 + "1" + "}" * 5000, "{", "[1, 2"):
            r = client.request(method, path, content=body, headers={"content-type": "application/json"})
            assert r.headers["content-type"] == PROBLEM_JSON, (path, r.text[:200])
            assert str(r.status_code) in paths[template][method]["responses"], (path, r.status_code, r.text[:200])
