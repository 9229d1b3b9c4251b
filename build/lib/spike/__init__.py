"""spike: a SPIFFE-native secrets manager with a sans-IO custody core."""

__version__ = "0.1.0"
