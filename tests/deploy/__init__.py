"""Deployment tests: container images, the compose file, and other shipped deployment assets."""
