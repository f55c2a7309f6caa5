"""Tabiji's Policy Enforcement Point: the gateway service in front of the town's web systems."""
