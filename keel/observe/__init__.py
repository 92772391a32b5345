"""Observability: the usage ledger, traces, metrics, cost reports."""
