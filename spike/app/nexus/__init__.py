"""The Nexus server: its runner, routes and APIs, the authorizer, audit log and metrics."""
