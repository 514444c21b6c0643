"""The OpenAPI 3.1 document: every endpoint, its request body, responses and error shape."""
from __future__ import annotations

import falcon

from api.http import send_json
from api.validation import NO_CONTROL_PATTERN

NAME = {"type": "string", "minLength": 1, "pattern": NO_CONTROL_PATTERN}
MONEY = {"type": "string", "pattern": r"^\d+\.\d{6}$", "examples": ["0.001250"]}
TIME = {"type": ["string", "null"], "format": "date-time"}
ERROR_TYPES = ["invalid_request_error", "authentication_error", "permission_error", "not_found_error",
               "conflict_error", "rate_limit_error", "idempotency_error", "billing_error", "api_error"]


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(properties: dict, required: list[str] | None = None, extra: bool = True) -> dict:
    schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    if not extra:
        schema["additionalProperties"] = False
    return schema


ITEM = _obj({
    "customer_item_id": {**NAME, "maxLength": 128},
    "operation": {"enum": ["responses", "chat.completions", "embeddings"]},
    "model": {**NAME, "maxLength": 128},
    "model_options": {"type": "array", "items": {**NAME, "maxLength": 128}, "maxItems": 16},
    "input": {"type": "object", "description": "the provider request body without model"},
    "max_output_tokens": {"type": "integer", "minimum": 1},
}, ["customer_item_id", "operation", "model", "input"], extra=False)
ENVELOPE = {
    "sla_tier": {"type": "string", "examples": ["standard"]},
    "routing_mode": {"enum": ["sla_aware", "cost", "latency", "pinned"]},
    "privacy_tier": {"enum": ["standard", "zero_retention", "local"]},
    "allowed_regions": {"type": "array", "items": {"type": "string"}, "minItems": 1},
    "items": {"type": "array", "items": _ref("Item"), "minItems": 1},
}
COUNTS = _obj({k: {"type": "integer"} for k in
               ("total", "queued", "running", "succeeded", "failed", "cancelled", "expired")})
SCHEMAS = {
    "Error": _obj({"error": _obj({
        "type": {"enum": ERROR_TYPES}, "code": {"type": "string"}, "message": {"type": "string"},
        "param": {"type": ["string", "null"]}, "request_id": {"type": ["string", "null"]},
        "details": {"type": "array", "items": _obj({"customer_item_id": {"type": "string"},
                                                     "code": {"type": "string"},
                                                     "message": {"type": "string"}})},
    }, ["type", "code", "message", "param", "request_id"])}, ["error"]),
    "Account": _obj({"id": {"type": "string"}, "object": {"const": "account"},
                     "agent_name": {"type": "string"}, "email": {"type": "string"},
                     "email_verified": {"type": "boolean"},
                     "monthly_spend_limit_usd": {"type": ["string", "null"]}, "created_at": TIME}),
    "ApiKey": _obj({"id": {"type": "string"}, "object": {"const": "api_key"}, "label": {"type": "string"},
                    "mode": {"enum": ["live", "test"]}, "prefix": {"type": "string"},
                    "key": {"type": "string", "description": "only in the 201"},
                    "created_at": TIME, "last_used_at": TIME}),
    "Item": ITEM,
    "QuoteRequest": _obj({**ENVELOPE, "max_cost_usd": {"type": "string"}}, ["items"], extra=False),
    "Quote": _obj({"id": {"type": "string"}, "object": {"const": "quote"},
                   "status": {"enum": ["locked", "used", "expired"]}, "expires_at": TIME,
                   "item_count": {"type": "integer"}, "items_digest": {"type": "string"},
                   "estimated_cost_usd": MONEY, "max_cost_usd": MONEY, "currency": {"const": "USD"},
                   "deadline_window_s": {"type": "integer"}, "lines": {"type": "array"}, **ENVELOPE}),
    "BatchRequest": _obj({**ENVELOPE, "quote_id": {"type": "string"},
                          "webhook": _obj({"url": {"type": "string"}, "secret": {"type": "string"}},
                                          ["url"], extra=False),
                          "metadata": {"type": "object", "maxProperties": 16,
                                       "additionalProperties": {"type": "string", "maxLength": 512}}},
                         ["quote_id", "items"], extra=False),
    "Batch": _obj({"id": {"type": "string"}, "object": {"const": "batch"}, "mode": {"type": "string"},
                   "status": {"enum": ["queued", "in_progress", "cancelling", "completed", "failed",
                                       "cancelled", "expired"]},
                   "quote_id": {"type": "string"}, "metadata": {"type": "object"}, "created_at": TIME,
                   "started_at": TIME, "completed_at": TIME, "ended_at": TIME, "deadline_at": TIME,
                   "cancelled_at": TIME, "counts": COUNTS,
                   "cost": _obj({"quoted_max_usd": MONEY, "estimated_usd": MONEY, "actual_usd": MONEY}),
                   "webhook": {"type": ["object", "null"]}, "results_url": {"type": "string"},
                   "artifact_urls": {"type": "array", "items": {"type": "string"}}}),
    "List": _obj({"object": {"const": "list"}, "data": {"type": "array"}, "has_more": {"type": "boolean"},
                  "next_cursor": {"type": ["string", "null"]}}),
    "Usage": _obj({"object": {"const": "usage"}, "start": {"type": "string"}, "end": {"type": "string"},
                   "group_by": {"enum": ["day", "model", "batch", "api_key"]}, "data": {"type": "array"},
                   "total_cost_usd": MONEY}),
}

# (path, method, summary, auth, request schema or None, success status, response schema or None,
#  error statuses)
OPERATIONS = [
    ("/healthz", "get", "Liveness", None, None, 200, None, []),
    ("/readyz", "get", "Readiness (503 while recovering)", None, None, 200, None, [503]),
    ("/metrics", "get", "Prometheus metrics", None, None, 200, None, []),
    ("/v1/openapi.json", "get", "This document", None, None, 200, None, []),
    ("/v1/models", "get", "The model catalogue with routes and list prices", None, None, 200, "List", []),
    ("/v1/auth/agent-register", "post", "Register an agent", None, "Register", 201, None,
     [400, 409, 413, 415, 422, 429]),
    ("/v1/auth/verify-email/confirm", "post", "Verify an email with its token", None, "Token", 200, None,
     [400, 409, 415, 422]),
    ("/v1/auth/verify-email/confirm", "get", "Verify by the emailed link", None, None, 200, None, [409, 422]),
    ("/v1/auth/verify-email/resend", "post", "Send the verification email again", "session", None, 202,
     None, [401, 429, 503]),
    ("/v1/auth/login", "post", "Log in", None, "Login", 200, None, [400, 401, 415, 422, 429]),
    ("/v1/auth/logout", "post", "Revoke every session", "session", None, 204, None, [401]),
    ("/v1/auth/account", "get", "The account", "either", None, 200, None, [401]),
    ("/v1/auth/account", "patch", "Set the account's monthly spend limit", "session", "SpendLimit", 200,
     None, [400, 401, 415, 422]),
    ("/v1/auth/account/api-keys", "post", "Create an API key (shown once)", "session", "KeyRequest", 201,
     "ApiKey", [400, 401, 403, 415, 422]),
    ("/v1/auth/account/api-keys", "get", "List API keys", "session", None, 200, "List", [401, 422]),
    ("/v1/auth/account/api-keys/{key_id}", "delete", "Revoke an API key", "session", None, 204, None,
     [401, 404]),
    ("/v1/quotes/model", "post", "Lock a price quote", "key", "QuoteRequest", 201, "Quote",
     [400, 401, 402, 413, 415, 422]),
    ("/v1/quotes/{quote_id}", "get", "A quote", "key", None, 200, "Quote", [401, 404]),
    ("/v1/batches", "post", "Submit a batch against a quote", "key", "BatchRequest", 202, "Batch",
     [400, 401, 402, 404, 409, 413, 415, 422]),
    ("/v1/batches", "get", "List batches", "key", None, 200, "List", [401, 422]),
    ("/v1/batches/{batch_id}", "get", "A batch", "key", None, 200, "Batch", [401, 404]),
    ("/v1/batches/{batch_id}", "delete", "Delete an ended batch's results", "key", None, 204, None,
     [401, 404, 409]),
    ("/v1/batches/{batch_id}/cancel", "post", "Cancel a batch", "key", None, 200, "Batch", [401, 404]),
    ("/v1/batches/{batch_id}/results", "get", "Results so far (JSON lines)", "key", None, 200, None,
     [401, 404, 410, 422]),
    ("/v1/batches/{batch_id}/artifact-urls", "post", "Mint fresh artifact URLs", "key", None, 200, None,
     [401, 404]),
    ("/v1/batches/{batch_id}/webhook-deliveries", "get", "The webhook delivery log", "key", None, 200,
     "List", [401, 404, 422]),
    ("/v1/batches/{batch_id}/webhook-deliveries/redeliver", "post", "Send the webhook again", "key",
     None, 202, "List", [401, 404, 409]),
    ("/v1/artifacts/{token}", "get", "Download an artifact by signed URL", None, None, 200, None,
     [403, 404, 410, 416]),
    ("/v1/usage", "get", "Usage from the ledger", "either", None, 200, "Usage", [401, 422]),
    ("/v1/usage.csv", "get", "Usage as CSV", "either", None, 200, None, [401, 422]),
]
# Successes besides the main one (no JSON body of their own).
OTHER_SUCCESSES = {("/v1/artifacts/{token}", "get"): {"206": "the byte range asked for (Range)",
                                                      "304": "unchanged since the ETag sent"}}
BODIES = {
    "Register": _obj({"agent_name": {**NAME, "maxLength": 64},
                      "email": {"type": "string", "format": "email"},
                      "password": {"type": "string", "minLength": 10}},
                     ["agent_name", "email", "password"], extra=False),
    "Token": _obj({"token": {"type": "string"}}, ["token"], extra=False),
    "Login": _obj({"email": {"type": "string"}, "password": {"type": "string"}},
                  ["email", "password"], extra=False),
    "SpendLimit": _obj({"monthly_spend_limit_usd": {"type": ["string", "null"]}},
                       ["monthly_spend_limit_usd"], extra=False),
    "KeyRequest": _obj({"label": {**NAME, "maxLength": 64},
                        "mode": {"enum": ["live", "test"]}}, ["label"], extra=False),
}
SECURITY = {None: [], "session": [{"session": []}], "key": [{"api_key": []}],
            "either": [{"session": []}, {"api_key": []}]}


def _operation(path: str, method: str, summary: str, auth: str | None, body: str | None,
               status: int, schema: str | None, errors: list[int]) -> dict:
    params = [{"name": name.strip("{}"), "in": "path", "required": True, "schema": {"type": "string"}}
              for name in path.split("/") if name.startswith("{")]
    responses = {str(status): {"description": "success"}}
    if schema:
        responses[str(status)]["content"] = {"application/json": {"schema": _ref(schema)}}
    for code, description in OTHER_SUCCESSES.get((path, method), {}).items():
        responses[code] = {"description": description}
    for code in sorted(set(errors) | ({401} if auth else set()) | {500}):
        responses[str(code)] = {"description": "error",
                                "content": {"application/json": {"schema": _ref("Error")}}}
    operation = {"summary": summary, "security": SECURITY[auth], "responses": responses}
    if params:
        operation["parameters"] = params
    if body:
        operation["requestBody"] = {"required": True,
                                    "content": {"application/json": {"schema": _ref(body)}}}
    return operation


def document(public_url: str) -> dict:
    paths: dict[str, dict] = {}
    for path, method, summary, auth, body, status, schema, errors in OPERATIONS:
        paths.setdefault(path, {})[method] = _operation(path, method, summary, auth, body, status, schema,
                                                        errors)
    return {
        "openapi": "3.1.0",
        "info": {"title": "BatchRouter", "version": "1.0.0",
                 "description": "Async batch service for model calls: quote, submit, poll or webhook."},
        "servers": [{"url": public_url}],
        "paths": paths,
        "components": {
            "schemas": {**SCHEMAS, **BODIES},
            "securitySchemes": {
                "session": {"type": "http", "scheme": "bearer",
                            "description": "session token from register or login"},
                "api_key": {"type": "http", "scheme": "bearer", "description": "ob_live_ or ob_test_ key"},
            },
        },
    }


class OpenApi:
    def __init__(self, public_url: str) -> None:
        self._document = document(public_url)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        send_json(resp, 200, self._document)
