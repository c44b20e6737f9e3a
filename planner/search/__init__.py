"""Search: enumerate and price layouts (`layouts`), split pipeline stages with an ILP (`ilp`)."""

from autoshard.planner.search.layouts import SearchResult, search

__all__ = ["SearchResult", "search"]
