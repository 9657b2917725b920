"""Load balancers: backend weights from measured load, and connection draining."""
