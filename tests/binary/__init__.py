"""Tests: binary."""
