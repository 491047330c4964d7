"""lockgw gateway."""
