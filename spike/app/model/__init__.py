"""What the store keeps, independent of any database: secret paths and versions, policies."""
