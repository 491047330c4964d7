"""The MQTT topic tree of one gateway, in one place (docs/mqtt-api.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topics:
    """Topic names under ``prefix`` for gateway ``gateway_id``."""

    prefix: str
    gateway_id: str

    @property
    def base(self) -> str:
        return f"{self.prefix}/gw/{self.gateway_id}"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def commands(self) -> str:
        return f"{self.base}/commands"

    @property
    def fleet_commands(self) -> str:
        return f"{self.prefix}/fleet/commands"

    @property
    def responses(self) -> str:
        return f"{self.base}/responses"

    @property
    def alarms(self) -> str:
        return f"{self.base}/alarms"

    @property
    def audit(self) -> str:
        """Where every auditor's export is recorded (gateway.audit)."""
        return f"{self.base}/audit"

    @property
    def requests(self) -> str:
        """Where a technician's requests go to the registry (``lockgw decommission``)."""
        return f"{self.base}/requests"

    @property
    def registrations(self) -> str:
        return f"{self.base}/registrations"

    def device_state(self, device_id: str) -> str:
        return f"{self.base}/devices/{device_id}/state"

    def device_events(self, device_id: str) -> str:
        return f"{self.base}/devices/{device_id}/events"

    def update_progress(self, update_id: str) -> str:
        return f"{self.base}/updates/{update_id}/progress"
