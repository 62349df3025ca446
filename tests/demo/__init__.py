"""Tests of the demo artifacts."""
