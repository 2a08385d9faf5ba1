"""tradingd: process lifecycle, config, event loop, feed ingest, windows, batcher, policy, CLI."""
