"""Helpers that run tests as several JAX processes on one machine (loopback only)."""
