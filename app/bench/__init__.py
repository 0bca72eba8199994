"""Benchmarks that print figures (`netmoe bench ...`): solver, service, emulated cluster."""
