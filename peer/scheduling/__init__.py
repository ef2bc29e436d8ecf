"""Scheduling: which pieces come from peers and which from the mirror (pure policy)."""
