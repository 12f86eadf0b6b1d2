"""Encoders, their registry and safe checkpoint IO."""
