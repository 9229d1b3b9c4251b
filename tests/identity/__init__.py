"""Tests: identity."""
