"""Money as integers: micro-USD for amounts, nano-USD per million tokens for prices."""
from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

MICRO = 10**6           # micro-USD per USD
NANO = 10**9            # price unit: nano-USD per million tokens
# The largest amount or price taken from outside: its nano-USD still fits a signed 64-bit
# column, and arithmetic on it never leaves Decimal's range.
MAX_DECIMAL = Decimal(10**9)


def parse_decimal(text: str) -> Decimal:
    """A non-negative, finite decimal string (no floats anywhere on the money path)."""
    if not isinstance(text, str):
        raise ValueError("must be a decimal string such as \"0.25\"")
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"{text!r} is not a decimal number") from None
    if not value.is_finite() or value < 0:
        raise ValueError(f"{text!r} must be a finite, non-negative decimal")
    if value > MAX_DECIMAL:
        raise ValueError(f"{text[:40]!r} is above the largest accepted amount, {MAX_DECIMAL}")
    return value


def price_to_nano(value: Decimal) -> int:
    """USD per million tokens -> integer nano-USD per million tokens (half-up)."""
    return int((value * NANO).to_integral_value(rounding=ROUND_HALF_UP))


def usd_to_micro(value: Decimal) -> int:
    return int((value * MICRO).to_integral_value(rounding=ROUND_HALF_UP))


def line_cost_micro(input_tokens: int, output_tokens: int, in_nano: int, out_nano: int,
                    *, round_up: bool = False) -> int:
    """One item's cost, rounded once over the sum so two roundings never add up."""
    numerator = input_tokens * in_nano + output_tokens * out_nano
    denominator = 10**9
    if round_up:
        return -(-numerator // denominator)
    return (2 * numerator + denominator) // (2 * denominator)


def format_usd(micro: int) -> str:
    """Micro-USD -> "0.001250"."""
    sign = "-" if micro < 0 else ""
    micro = abs(micro)
    return f"{sign}{micro // MICRO}.{micro % MICRO:06d}"


def format_price(nano: int) -> str:
    """Nano-USD per Mtok -> USD per Mtok, 6 decimals unless finer digits are needed."""
    whole, frac = divmod(nano, NANO)
    digits = f"{frac:09d}".rstrip("0")
    return f"{whole}.{digits.ljust(6, '0')}"
