"""Tests: examples."""
