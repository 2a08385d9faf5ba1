"""Market-data feed: protocol v1 messages, ingest, replay server and synthetic universe."""
