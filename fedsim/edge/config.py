"""The ``edge:`` section of a scenario: the edge demo on Flower's deployment runtime.

Device profiles turn what a device measured (seconds of compute, bytes moved) into the
latency and energy it would see on the profiled hardware (:mod:`fedsim.edge.profiles`).
Certificates (``tls``) switch SuperLink <-> SuperNode traffic to TLS; without them the
demo runs insecure on loopback.

This module must not import :mod:`fedsim.config` (which imports it).
"""

from __future__ import annotations

from pydantic import Field, field_validator

from fedsim.schema import Section


class DeviceProfile(Section):
    """One kind of edge device, relative to the machine running the demo.

    ``compute``: speed relative to this machine (0.25 = four times slower);
    ``uplink_mbps`` / ``downlink_mbps``: link bandwidth in megabits per second;
    ``rtt_ms``: round-trip time added to every exchange with the cloud;
    ``memory_mb``: memory available to the model (parameters + activations of one batch);
    ``compute_w``: power drawn while computing; ``radio_nj_per_bit``: radio energy per bit
    sent or received.
    """

    name: str = "device"
    compute: float = Field(1.0, gt=0)
    uplink_mbps: float = Field(10.0, gt=0)
    downlink_mbps: float = Field(50.0, gt=0)
    rtt_ms: float = Field(20.0, ge=0)
    memory_mb: float = Field(512.0, gt=0)
    compute_w: float = Field(3.0, ge=0)
    radio_nj_per_bit: float = Field(100.0, ge=0)


class TLSConfig(Section):
    """PEM files (paths relative to the scenario file), e.g. from ``fedsim edge certs``."""

    ca: str
    cert: str
    key: str

    @field_validator("ca", "cert", "key")
    @classmethod
    def _path(cls, value: str) -> str:
        if "\0" in value or len(value) > 4096:
            raise ValueError("must be a file path (no NUL byte, at most 4096 characters)")
        return value


class EdgeConfig(Section):
    """How the demo starts Flower's deployment runtime and what its devices are."""

    host: str = Field("127.0.0.1", description="loopback address the SuperLink listens on")
    port: int = Field(0, ge=0, le=65535, description="SuperLink port; 0 picks a free one")
    startup_timeout_s: float = Field(90.0, gt=0)
    run_timeout_s: float = Field(1800.0, gt=0)
    tls: TLSConfig | None = None
    profiles: dict[str, DeviceProfile] = Field(default_factory=lambda: {"default": DeviceProfile(name="default")})
    devices: dict[int, str] = Field(default_factory=dict, description="client id -> profile name (others: 'default')")

    @field_validator("host")
    @classmethod
    def _loopback(cls, value: str) -> str:
        if value not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(
                f"must be a loopback address (127.0.0.1, localhost or ::1), got '{value}': the demo never listens on other interfaces"
            )
        return value

    @field_validator("profiles")
    @classmethod
    def _has_default(cls, value: dict[str, DeviceProfile]) -> dict[str, DeviceProfile]:
        if "default" not in value:
            value = {"default": DeviceProfile(name="default"), **value}
        for name, profile in value.items():
            profile.name = name
        return value

    def profile_of(self, client_id: int) -> DeviceProfile:
        return self.profiles[self.devices.get(int(client_id), "default")]
