"""Benchmarks: scripts run by hand that print a table and write JSON. Not tests."""
