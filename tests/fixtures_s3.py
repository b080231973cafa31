"""S3 (SeaweedFS) fixtures for tests: see infra/s3server.py."""
