"""Coupling discovery: channel flow over a captured graph, units, sites, scopes, repeated blocks, auto_couple."""
