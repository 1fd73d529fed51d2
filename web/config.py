"""Configuration: one TOML file plus LOA_<SECTION>_<KEY> environment overrides.

Defaults need nothing beyond the package. Every key is typed by its default; an unknown key or a
value of the wrong type is an error at start-up, not a surprise at 3 a.m.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from loa.codecs.encoders import EncoderSettings
from loa.relay.archive import ArchiveSettings
from loa.relay.devices.manager import DeviceSettings
from loa.relay.devices.mqtt import MqttSettings
from loa.relay.devices.ota import FirmwareSettings
from loa.relay.exchange import ExchangeSettings
from loa.relay.hls import HlsSettings
from loa.relay.icecast import HttpStreamSettings
from loa.relay.ingest import IngestSettings
from loa.relay.inputs import RelayInputSettings
from loa.relay.notify import NotifySettings
from loa.relay.rtp.out import RtpSettings
from loa.relay.upstream import UpstreamSettings
from loa.relay.urlpolicy import FetchSettings
from loa.relay.webrtc import WebRtcSettings
from loa.streamer.deadair import DeadAirSettings
from loa.streamer.emergency.service import EmergencySettings
from loa.streamer.engine import EngineSettings


class ConfigError(ValueError):
    pass


@dataclass
class ServerConfig:
    http: str = "127.0.0.1:8080"
    data: str = "./loa-data"
    public_url: str = ""  # how devices and people reach this node (stream URLs); derived if empty
    header_timeout: float = 15.0  # seconds to send a request's headers (slowloris); also idle


@dataclass
class AreasConfig:
    csv: str = ""  # official administrative units list imported at first start
    root_code: str = "ROOT"  # used at first start when no csv is given
    root_name: str = "Tỉnh"
    root_level: str = "province"


@dataclass
class AuthConfig:
    token_ttl_hours: float = 12.0
    max_failed_logins: int = 5


@dataclass
class MediaConfig:
    max_mb: int = 200
    max_seconds: float = 4 * 3600.0
    loudness_target: float = -16.0
    tts_voice: str = "vi"


@dataclass
class LogConfig:
    level: str = "info"
    format: str = "kv"  # kv | json


@dataclass
class Config:
    store: str = "sqlite"  # "sqlite" (under the data directory) or "redis://host:port/db"
    store_prefix: str = "loa:"
    server: ServerConfig = field(default_factory=ServerConfig)
    areas: AreasConfig = field(default_factory=AreasConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    media: MediaConfig = field(default_factory=MediaConfig)
    engine: EngineSettings = field(default_factory=EngineSettings)
    encoders: EncoderSettings = field(default_factory=EncoderSettings)
    log: LogConfig = field(default_factory=LogConfig)
    http_streams: HttpStreamSettings = field(default_factory=HttpStreamSettings)
    rtp: RtpSettings = field(default_factory=RtpSettings)
    hls: HlsSettings = field(default_factory=HlsSettings)
    webrtc: WebRtcSettings = field(default_factory=WebRtcSettings)
    inputs: RelayInputSettings = field(default_factory=RelayInputSettings)
    devices: DeviceSettings = field(default_factory=DeviceSettings)
    firmware: FirmwareSettings = field(default_factory=FirmwareSettings)
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    emergency: EmergencySettings = field(default_factory=EmergencySettings)
    fetch: FetchSettings = field(default_factory=FetchSettings)
    exchange: ExchangeSettings = field(default_factory=ExchangeSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    archive: ArchiveSettings = field(default_factory=ArchiveSettings)
    alerts: NotifySettings = field(default_factory=NotifySettings)
    ingest: IngestSettings = field(default_factory=IngestSettings)
    dead_air: DeadAirSettings = field(default_factory=DeadAirSettings)

    @property
    def data_dir(self) -> Path:
        return Path(self.server.data).expanduser()


def _coerce(name: str, default: Any, value: Any) -> Any:
    kind = type(default)
    if kind is list:  # lists of strings: a TOML array, or "a,b" from the environment
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name}: expected a list of strings, got {value!r}")
        return value
    if isinstance(value, str) and kind is not str:
        try:
            if kind is bool:
                low = value.strip().lower()
                if low not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
                    raise ValueError(value)
                return low in {"1", "true", "yes", "on"}
            return kind(value)
        except ValueError:
            raise ConfigError(f"{name}: expected {kind.__name__}, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{name}: expected {kind.__name__}, got {value!r}")
    return value


def _apply(section_name: str, obj: Any, values: dict[str, Any]) -> None:
    known = {f.name for f in fields(obj) if not f.name.startswith("_")}
    for key, value in values.items():
        if key not in known or isinstance(getattr(obj, key), EncoderSettings):
            raise ConfigError(f"unknown config key [{section_name}] {key}")
        setattr(obj, key, _coerce(f"[{section_name}] {key}", getattr(obj, key), value))


# Config sections by length, longest first: LOA_HTTP_STREAMS_BURST_MS is [http_streams]
# burst_ms, never an [http] section; top-level keys (store, store_prefix) are no sections.
_SECTIONS = sorted((f.name for f in fields(Config) if f.name not in ("store", "store_prefix")),
                   key=len, reverse=True)


def _env_section(key: str) -> tuple[str, str] | None:
    """(section, key) of a LOA_<SECTION>_<KEY> variable; None for LOA_ variables of other
    tools (and of the tests), which are not ours to refuse."""
    if not key.startswith("LOA_"):
        return None
    rest = key[4:].lower()
    for section in _SECTIONS:
        if rest.startswith(section + "_") and len(rest) > len(section) + 1:
            return section, rest[len(section) + 1:]
    return None


def load_config(path: str | os.PathLike[str] | None = None,
                env: dict[str, str] | None = None, **overrides: Any) -> Config:
    cfg = Config()
    data: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config {path} is not valid TOML: {e}") from None
    env = dict(os.environ if env is None else env)
    for top in ("store", "store_prefix"):
        if f"LOA_{top.upper()}" in env:
            data[top] = env.pop(f"LOA_{top.upper()}")
    for key, value in env.items():
        found = _env_section(key)
        if found is not None:
            section, name = found
            data.setdefault(section, {})[name] = value
    for section, values in data.items():
        if section in ("store", "store_prefix"):
            if not isinstance(values, str):
                raise ConfigError(f"{section}: expected a string like \"redis://127.0.0.1:6379/0\"")
            setattr(cfg, section, values)
            continue
        obj = getattr(cfg, section, None)
        if obj is None or not isinstance(values, dict):
            raise ConfigError(f"unknown config section [{section}]")
        _apply(section, obj, values)
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg.server, key, value)
    cfg.engine.encoders = cfg.encoders
    cfg.engine.__post_init__()
    cfg.emergency.__post_init__()
    try:
        cfg.fetch.__post_init__()
    except ValueError as e:
        raise ConfigError(f"[fetch] {e}") from None
    if (bad := cfg.dead_air.check()) is not None:
        raise ConfigError(f"[dead_air] {bad[0]}: {bad[1]}")
    try:
        cfg.firmware.trusted()
        cfg.mqtt.__post_init__()
        cfg.mqtt.broker()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for check in (cfg.exchange.__post_init__, cfg.archive.__post_init__,
                  cfg.alerts.__post_init__):
        try:
            check()
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return cfg
