"""The test suite: one package per tier; helpers are imported by their package path."""
