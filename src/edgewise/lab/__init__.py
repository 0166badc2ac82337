"""Workstation side: train/convert, optimize, package. Never imported by the agent."""
