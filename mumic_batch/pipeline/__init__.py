"""One module per job: read, transform, write."""
