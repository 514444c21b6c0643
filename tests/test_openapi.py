"""The OpenAPI document and the routes agree, both ways; every error answer has one shape."""
from __future__ import annotations

import re

from api.app import routes
from api.openapi import OPERATIONS
from tests.harness import Api

METHODS = ("get", "post", "patch", "delete", "put")


def served(runtime) -> set[tuple[str, str]]:
    found = set()
    for path, resource in routes(runtime.services):
        for method in METHODS:
            if hasattr(resource, f"on_{method}"):
                found.add((re.sub(r"\{(\w+)\}", r"{\1}", path), method))
    return found


def test_every_route_is_documented_and_every_entry_served(runtime) -> None:
    documented = {(path, method) for path, method, *_ in OPERATIONS}
    assert served(runtime) == documented


def test_document_is_openapi_31_and_served(api: Api) -> None:
    status, doc, _ = api.get("/v1/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.1")
    assert "/v1/batches" in doc["paths"] and "post" in doc["paths"]["/v1/batches"]
    error = doc["components"]["schemas"]["Error"]["properties"]["error"]
    assert set(error["required"]) == {"type", "code", "message", "param", "request_id"}
    # Answers the routes give besides their main one are listed too.
    artifact = doc["paths"]["/v1/artifacts/{token}"]["get"]["responses"]
    assert {"200", "206", "304", "403", "410"} <= set(artifact)
    assert "410" in doc["paths"]["/v1/batches/{batch_id}/results"]["get"]["responses"]


def test_unknown_route_and_wrong_method_have_the_error_shape(api: Api) -> None:
    for method, path, expected in (("GET", "/v1/nope", 404), ("PUT", "/v1/batches", 405),
                                   ("DELETE", "/v1/quotes/model", 405)):
        status, body, headers = api.call(method, path)
        assert status == expected, (method, path, status)
        assert set(body["error"]) >= {"type", "code", "message", "param", "request_id"}
        assert body["error"]["request_id"] == headers.get("X-Request-Id", headers.get("x-request-id"))
