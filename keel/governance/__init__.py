"""Governance: policies by data classification, guards, the review queue and the hash-chained audit log."""
