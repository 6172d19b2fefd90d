"""Bridges to other adapter libraries."""
