"""Orders, their life cycle, the journal, gateway clients and the broker simulator."""
