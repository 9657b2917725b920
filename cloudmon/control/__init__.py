"""Control loops' shared machinery: the arbiter that keeps them from fighting."""
