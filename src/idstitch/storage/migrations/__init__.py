"""Numbered schema migrations, one folder per adapter."""
