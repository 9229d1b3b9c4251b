"""The Nexus API's message types: the contract between the server and every client command."""
