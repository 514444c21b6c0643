"""The peewee models: accounts, keys, quotes, batches, items, ledger, idempotency, webhooks."""
from __future__ import annotations

import enum

import peewee

database_proxy = peewee.DatabaseProxy()


class BatchStatus(enum.StrEnum):
    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    CANCELLING = "cancelling"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


FINAL_BATCH_STATUSES = (BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.CANCELLED,
                        BatchStatus.EXPIRED)


class ItemStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


FINAL_ITEM_STATUSES = (ItemStatus.SUCCEEDED, ItemStatus.FAILED, ItemStatus.CANCELLED,
                       ItemStatus.EXPIRED)


class Mode(enum.StrEnum):
    LIVE = "live"
    TEST = "test"


class BaseModel(peewee.Model):
    class Meta:
        database = database_proxy


class SchemaVersion(BaseModel):
    id = peewee.IntegerField(primary_key=True)
    version = peewee.IntegerField()


class JournalState(BaseModel):
    """The journal position the SQLite view has applied, committed with what it applied."""
    id = peewee.IntegerField(primary_key=True)
    applied_position = peewee.BigIntegerField()


class Account(BaseModel):
    id = peewee.CharField(primary_key=True)
    agent_name = peewee.CharField()
    email = peewee.CharField(unique=True)
    password_hash = peewee.CharField()
    email_verified = peewee.BooleanField(default=False)
    session_version = peewee.IntegerField(default=1)
    monthly_spend_limit_micro = peewee.BigIntegerField(null=True)
    created_at = peewee.FloatField()


class EmailToken(BaseModel):
    """One row per verification email sent; a token is good once."""
    nonce = peewee.CharField(primary_key=True)
    account = peewee.ForeignKeyField(Account, on_delete="CASCADE")
    created_at = peewee.FloatField()
    used_at = peewee.FloatField(null=True)


class ApiKey(BaseModel):
    id = peewee.CharField(primary_key=True)
    account = peewee.ForeignKeyField(Account, on_delete="CASCADE")
    label = peewee.CharField()
    mode = peewee.CharField()
    key_hash = peewee.CharField(unique=True)
    prefix = peewee.CharField()
    created_at = peewee.FloatField()
    last_used_at = peewee.FloatField(null=True)
    revoked_at = peewee.FloatField(null=True)


class RateEvent(BaseModel):
    """Abuse-limit counters (registrations per IP, login failures per email+IP)."""
    kind = peewee.CharField()
    subject = peewee.CharField()
    at = peewee.FloatField()

    class Meta:
        indexes = ((("kind", "subject", "at"), False),)


class Quote(BaseModel):
    id = peewee.CharField(primary_key=True)
    account = peewee.ForeignKeyField(Account, on_delete="CASCADE")
    api_key_id = peewee.CharField()
    mode = peewee.CharField()
    created_at = peewee.FloatField()
    expires_at = peewee.FloatField()
    sla_tier = peewee.CharField()
    routing_mode = peewee.CharField()
    privacy_tier = peewee.CharField()
    allowed_regions = peewee.TextField()          # JSON list
    item_count = peewee.IntegerField()
    items_digest = peewee.CharField()
    estimated_micro = peewee.BigIntegerField()
    max_micro = peewee.BigIntegerField()
    routes = peewee.TextField()                   # JSON: the locked routes and prices
    body = peewee.TextField()                     # JSON: the quote object as answered
    used_by = peewee.CharField(null=True)


class Batch(BaseModel):
    id = peewee.CharField(primary_key=True)
    account = peewee.ForeignKeyField(Account, on_delete="CASCADE")
    api_key_id = peewee.CharField()
    mode = peewee.CharField()
    status = peewee.CharField(index=True)
    quote_id = peewee.CharField()
    sla_tier = peewee.CharField()
    routing_mode = peewee.CharField()
    privacy_tier = peewee.CharField()
    allowed_regions = peewee.TextField()
    metadata = peewee.TextField()
    created_at = peewee.FloatField()
    started_at = peewee.FloatField(null=True)
    completed_at = peewee.FloatField(null=True)
    ended_at = peewee.FloatField(null=True)
    deadline_at = peewee.FloatField()
    cancelled_at = peewee.FloatField(null=True)
    deleted_at = peewee.FloatField(null=True)
    finalize_pending = peewee.BooleanField(default=False, index=True)
    total = peewee.IntegerField()
    queued = peewee.IntegerField()
    running = peewee.IntegerField(default=0)
    succeeded = peewee.IntegerField(default=0)
    failed = peewee.IntegerField(default=0)
    cancelled = peewee.IntegerField(default=0)
    expired = peewee.IntegerField(default=0)
    quoted_max_micro = peewee.BigIntegerField()
    estimated_micro = peewee.BigIntegerField()
    actual_micro = peewee.BigIntegerField(default=0)
    webhook_url = peewee.TextField(null=True)
    webhook_secret = peewee.TextField(null=True)  # sealed (encrypted) secret
    webhook_secret_last4 = peewee.CharField(null=True)
    artifacts = peewee.TextField(default="[]")    # JSON list of written artifact names
    first_position = peewee.BigIntegerField()     # journal position of its submit record
    idempotency_key = peewee.CharField(null=True)

    class Meta:
        indexes = ((("account", "mode", "created_at"), False), (("ended_at", "deadline_at"), False))


class Item(BaseModel):
    batch = peewee.ForeignKeyField(Batch, on_delete="CASCADE")
    idx = peewee.IntegerField()
    account_id = peewee.CharField()
    mode = peewee.CharField()
    customer_item_id = peewee.CharField()
    operation = peewee.CharField()
    model = peewee.CharField()
    status = peewee.CharField()
    deadline_at = peewee.FloatField()
    next_attempt_at = peewee.FloatField(default=0.0)
    input_position = peewee.BigIntegerField()
    result_position = peewee.BigIntegerField(null=True)
    route_index = peewee.IntegerField(default=0)
    attempts = peewee.TextField(default="[]")     # JSON list of attempts made so far
    est_input_tokens = peewee.IntegerField()
    max_output_tokens = peewee.IntegerField()
    max_cost_micro = peewee.BigIntegerField()
    cost_micro = peewee.BigIntegerField(default=0)
    started_at = peewee.FloatField(null=True)
    completed_at = peewee.FloatField(null=True)

    class Meta:
        indexes = (
            (("batch", "idx"), True),
            (("status", "deadline_at", "batch", "idx"), False),
            (("status", "account_id", "deadline_at"), False),
        )


class IdempotencyKey(BaseModel):
    account_id = peewee.CharField()
    mode = peewee.CharField()
    key = peewee.CharField()
    body_digest = peewee.CharField()
    response = peewee.TextField()                 # sealed bytes of the first 202
    batch_id = peewee.CharField()
    created_at = peewee.FloatField()

    class Meta:
        indexes = ((("account_id", "mode", "key"), True),)


class LedgerEntry(BaseModel):
    id = peewee.CharField(primary_key=True)
    account_id = peewee.CharField(index=True)
    api_key_id = peewee.CharField()
    batch_id = peewee.CharField(index=True)
    item_key = peewee.CharField(unique=True)      # "<batch_id>:<idx>": a replay cannot bill twice
    customer_item_id = peewee.CharField()
    model = peewee.CharField()
    provider = peewee.CharField()
    input_tokens = peewee.IntegerField()
    output_tokens = peewee.IntegerField()
    input_price_nano = peewee.BigIntegerField()
    output_price_nano = peewee.BigIntegerField()
    amount_micro = peewee.BigIntegerField()
    estimated = peewee.BooleanField(default=False)
    created_at = peewee.FloatField(index=True)
    day = peewee.CharField(index=True, default="")   # UTC "YYYY-MM-DD" of created_at (reports)


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class WebhookDelivery(BaseModel):
    """One webhook message; its body is stored once and re-sent byte for byte on every retry."""
    id = peewee.CharField(primary_key=True)
    batch_id = peewee.CharField(index=True)
    account_id = peewee.CharField()
    event = peewee.CharField()
    url = peewee.TextField()
    body = peewee.TextField()
    status = peewee.CharField()
    attempts = peewee.TextField(default="[]")     # JSON list of {n, at, duration_ms, status_code, error}
    next_attempt_at = peewee.FloatField(null=True)
    created_at = peewee.FloatField()

    class Meta:
        indexes = ((("status", "next_attempt_at"), False),)


ALL_MODELS = [JournalState, Account, EmailToken, ApiKey, RateEvent, Quote, Batch, Item,
              IdempotencyKey, LedgerEntry, WebhookDelivery]
