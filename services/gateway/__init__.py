"""The gateway: the REST API clients use. It never talks to a pool directly."""
