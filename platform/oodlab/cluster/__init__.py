"""Cluster plumbing below everything that trains: local Ray, S3 storage, Ray Jobs."""
