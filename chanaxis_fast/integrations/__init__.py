"""Adapters to other libraries. Nothing in chanaxis_fast imports them; each imports its library
only when used."""
