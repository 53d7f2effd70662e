"""Client-side helpers for mmfuse; ``client.webhooks`` verifies callbacks and depends on the stdlib only."""
