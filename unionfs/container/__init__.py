"""Containers: running an image's process with an OCI runtime."""
