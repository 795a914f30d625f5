"""Scenarios started by an incoming call or SMS (spec 9.1.2), on the same durable path as device events."""
