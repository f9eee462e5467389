"""Tiny Django app used by django_check.py (models plus a committed initial migration)."""
