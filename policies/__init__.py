"""Enforcement policies, one module per rule, behind one small plugin interface."""
