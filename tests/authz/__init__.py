"""Tests: authz."""
