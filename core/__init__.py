"""Shared domain pieces: errors, configuration, money and time formats."""
