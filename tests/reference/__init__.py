"""Literal transcriptions of the official code (loops, float64), for the equality tests."""
