"""Workflows: durable, governed business processes."""
