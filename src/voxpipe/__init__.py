"""voxpipe: real-time cascaded voice agents with race-free barge-in and exact per-turn latency traces."""

__version__ = "0.1.0"
