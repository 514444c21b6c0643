"""Accounts, email tokens, API keys and abuse-limit counters."""
from __future__ import annotations

import peewee

from core.errors import Conflict
from store.models import Account, ApiKey, EmailToken, RateEvent
from store.pages import page


def create_account(db: peewee.Database, *, account_id: str, agent_name: str, email: str,
                   password_hash: str, verified: bool, now: float) -> Account:
    try:
        with db.atomic():
            return Account.create(id=account_id, agent_name=agent_name, email=email,
                                  password_hash=password_hash, email_verified=verified,
                                  created_at=now)
    except peewee.IntegrityError:
        raise Conflict(f"an account with email {email} already exists; log in instead",
                       code="email_taken", param="email") from None


def get_account(account_id: str) -> Account | None:
    return Account.get_or_none(Account.id == account_id)


def find_account_by_email(email: str) -> Account | None:
    return Account.get_or_none(Account.email == email)


def bump_session_version(db: peewee.Database, account_id: str) -> None:
    with db.atomic():
        Account.update(session_version=Account.session_version + 1).where(
            Account.id == account_id).execute()


def set_spend_limit(db: peewee.Database, account_id: str, limit_micro: int | None) -> None:
    with db.atomic():
        Account.update(monthly_spend_limit_micro=limit_micro).where(
            Account.id == account_id).execute()


def record_email_token(db: peewee.Database, nonce: str, account_id: str, now: float) -> None:
    with db.atomic():
        EmailToken.create(nonce=nonce, account=account_id, created_at=now)


def use_email_token(db: peewee.Database, nonce: str, account_id: str, now: float) -> str:
    """Marks the token used and the email verified; 'ok', 'used' or 'unknown'."""
    with db.atomic():
        updated = (EmailToken.update(used_at=now)
                   .where(EmailToken.nonce == nonce, EmailToken.account == account_id,
                          EmailToken.used_at.is_null())
                   .execute())
        if updated:
            Account.update(email_verified=True).where(Account.id == account_id).execute()
            return "ok"
        exists = EmailToken.get_or_none(EmailToken.nonce == nonce)
        return "used" if exists else "unknown"


def create_api_key(db: peewee.Database, *, key_id: str, account_id: str, label: str, mode: str,
                   key_hash: str, prefix: str, now: float) -> ApiKey:
    with db.atomic():
        return ApiKey.create(id=key_id, account=account_id, label=label, mode=mode,
                             key_hash=key_hash, prefix=prefix, created_at=now)


def find_api_key(key_hash: str) -> ApiKey | None:
    return (ApiKey.select(ApiKey, Account).join(Account)
            .where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_null()).first())


def touch_api_key(db: peewee.Database, key: ApiKey, now: float) -> None:
    """Coarse (once a minute): a read with a busy key must not queue for the write lock."""
    if key.last_used_at is not None and key.last_used_at >= now - 60:
        return
    with db.atomic():
        ApiKey.update(last_used_at=now).where(ApiKey.id == key.id).execute()


def list_api_keys(account_id: str, limit: int, after: str | None) -> tuple[list[ApiKey], bool]:
    query = ApiKey.select().where(ApiKey.account == account_id, ApiKey.revoked_at.is_null())
    return page(query, ApiKey, limit, after)


def revoke_api_key(db: peewee.Database, account_id: str, key_id: str, now: float) -> bool:
    with db.atomic():
        return bool(ApiKey.update(revoked_at=now).where(
            ApiKey.id == key_id, ApiKey.account == account_id,
            ApiKey.revoked_at.is_null()).execute())


def count_events(kind: str, subject: str, since: float) -> tuple[int, float | None]:
    """How many events since `since`, and when the oldest of them happened."""
    row = (RateEvent.select(peewee.fn.COUNT(RateEvent.id), peewee.fn.MIN(RateEvent.at))
           .where(RateEvent.kind == kind, RateEvent.subject == subject, RateEvent.at >= since)
           .tuples().first())
    return (row[0], row[1]) if row else (0, None)


def add_event(db: peewee.Database, kind: str, subject: str, now: float) -> None:
    with db.atomic():
        RateEvent.create(kind=kind, subject=subject, at=now)


def clear_events(db: peewee.Database, kind: str, subject: str) -> None:
    with db.atomic():
        RateEvent.delete().where(RateEvent.kind == kind, RateEvent.subject == subject).execute()


def prune_events(db: peewee.Database, before: float) -> int:
    with db.atomic():
        return RateEvent.delete().where(RateEvent.at < before).execute()
