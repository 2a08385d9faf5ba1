"""Model qualification: the backtest's metrics, gates and report (the runner drives the daemon's runtime)."""
