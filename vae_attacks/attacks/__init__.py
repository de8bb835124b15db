"""Adversarial attacks, each a pure function of one (source, target) pair."""
