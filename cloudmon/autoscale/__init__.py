"""Auto-scaling groups (AWS EC2 Auto Scaling semantics): specs, policies, controller, service."""
