"""lockgw simulators."""
