"""The PM service: turns requests into plans and starts their first tasks."""
