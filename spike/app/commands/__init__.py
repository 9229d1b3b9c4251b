"""The commands that talk to Nexus (SPIKE's Pilot), bootstrap, and the dev deployment."""
