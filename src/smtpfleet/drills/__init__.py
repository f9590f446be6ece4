"""Failure-injection drills: a local cluster under steady load, a fault, and a verdict."""
