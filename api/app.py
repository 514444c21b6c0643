"""create_app(services): the falcon app with every route; nothing read from the environment."""
from __future__ import annotations

import falcon

from api import artifacts, auth, batches, errors, keys, openapi, quotes, service, usage, webhooks
from api.context import Services
from api.http import RequestContext


def routes(services: Services) -> list[tuple[str, object]]:
    """Every (path, resource) the API serves; the OpenAPI test walks this list."""
    return [
        ("/healthz", service.Health()),
        ("/readyz", service.Ready(services)),
        ("/metrics", service.Metrics(services)),
        ("/v1/models", service.Models(services)),
        ("/v1/openapi.json", openapi.OpenApi(services.public_url)),
        ("/v1/auth/agent-register", auth.Register(services)),
        ("/v1/auth/verify-email/confirm", auth.VerifyEmail(services)),
        ("/v1/auth/verify-email/resend", auth.ResendVerification(services)),
        ("/v1/auth/login", auth.Login(services)),
        ("/v1/auth/logout", auth.Logout(services)),
        ("/v1/auth/account", auth.AccountResource(services)),
        ("/v1/auth/account/api-keys", keys.ApiKeys(services)),
        ("/v1/auth/account/api-keys/{key_id}", keys.ApiKeyItem(services)),
        ("/v1/quotes/model", quotes.Quotes(services)),
        ("/v1/quotes/{quote_id}", quotes.QuoteItem(services)),
        ("/v1/batches", batches.Batches(services)),
        ("/v1/batches/{batch_id}", batches.BatchItem(services)),
        ("/v1/batches/{batch_id}/cancel", batches.BatchCancel(services)),
        ("/v1/batches/{batch_id}/results", batches.BatchResults(services)),
        ("/v1/batches/{batch_id}/artifact-urls", batches.BatchArtifactUrls(services)),
        ("/v1/batches/{batch_id}/webhook-deliveries", webhooks.WebhookDeliveries(services)),
        ("/v1/batches/{batch_id}/webhook-deliveries/redeliver", webhooks.WebhookRedeliver(services)),
        ("/v1/artifacts/{token}", artifacts.Artifact(services)),
        ("/v1/usage", usage.Usage(services)),
        ("/v1/usage.csv", usage.UsageCsv(services)),
    ]


def create_app(services: Services) -> falcon.App:
    app = falcon.App(middleware=[RequestContext()], cors_enable=False)
    app.req_options.auto_parse_form_urlencoded = False
    app.req_options.strip_url_path_trailing_slash = True
    errors.install(app)
    for path, resource in routes(services):
        app.add_route(path, resource)
    return app
