"""The node's one typed configuration object, loaded from TOML.

Why one object: every part of the service (receiver, assembler, worker, dispatcher, metrics)
gets its settings passed down from here, so nothing reads files or environment variables on its
own, and a bad setting fails at start with a message naming the key instead of failing later in
the middle of a transfer.

`load_config(None)` gives the embedded defaults (AE title MOLRE on 127.0.0.1:11112, data in
./molre-data, demo checkpoint, CPU). Every key is documented in `config.example.toml`.
Relative paths in a config file are resolved against the directory of that file; relative
defaults (no file) against the working directory.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import ConfigError

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable, no backslash, <= 16 chars


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


@dataclass
class AllowedCaller:
    """One allow-list entry: a calling AE title and (optionally) where it may connect from.

    `host` is an IP address, a CIDR network ("10.1.0.0/16") or empty (= any host). `ae_title`
    "*" matches any calling AE title (host-only rule).
    """

    ae_title: str = "*"
    host: str = ""


@dataclass
class NetworkConfig:
    """DICOM listener and access control."""

    ae_title: str = "MOLRE"
    host: str = "127.0.0.1"
    port: int = 11112
    require_called_ae: bool = True
    allowed_callers: list[AllowedCaller] = field(default_factory=list)
    max_associations: int = 10
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    # listener hardening (node/listener.py, docs/conformance.md "Limits")
    # an empty allow-list admits everyone: only allowed off loopback when said explicitly
    allow_any_caller: bool = False
    # concurrent connections from one peer address (0 = half of max_associations, at least 1)
    max_associations_per_host: int = 0
    max_associate_rq_size: str = "256KiB"
    # rows per minute for connections refused before acceptance (the rest are counted)
    refusal_audit_per_minute: int = 60
    # receiver processes (node/receiver_pool.py): 0 = one per core (at most 4), 1 = all
    # associations in the node process
    receiver_processes: int = 0

    def per_host_limit(self) -> int:
        """`max_associations_per_host`, with 0 meaning half of `max_associations`."""
        if self.max_associations_per_host:
            return self.max_associations_per_host
        return max(1, self.max_associations // 2)


@dataclass
class TLSConfig:
    """DICOM TLS for the listener (and default CA for destinations with tls = true)."""

    enabled: bool = False
    certificate: str = ""
    key: str = ""
    ca: str = ""
    require_client_certificate: bool = False


#: Values of `storage.durability` (see StorageConfig and docs/configuration.md).
DURABILITY_MODES = ("fsync", "os")


@dataclass
class StorageConfig:
    """Where received instances, reports and the audit database live."""

    data_dir: str = "./molre-data"
    database_url: str = ""
    min_free_disk: str = "5%"
    # largest data set accepted on the wire, and inflated size of a deflated one (0xA700 above)
    max_instance_size: str = "1GiB"
    max_inflated_size: str = "1GiB"
    # "fsync": spool file + directory fsynced before C-STORE Success (survives a power cut);
    # "os": no fsync, data in the page cache at Success (survives kill -9, not a power cut)
    durability: str = "fsync"


@dataclass
class AssemblerConfig:
    """When a series counts as complete."""

    quiet_time_s: float = 10.0
    release_grace_s: float = 2.0
    poll_interval_s: float = 0.5


@dataclass
class SelectionConfig:
    """Which complete series are read by the model (the rest are skipped with a reason)."""

    modalities: list[str] = field(default_factory=lambda: ["CT"])
    image_type_required: list[str] = field(default_factory=lambda: ["ORIGINAL", "PRIMARY"])
    image_type_excluded: list[str] = field(
        default_factory=lambda: ["LOCALIZER", "DERIVED", "SECONDARY", "REFORMATTED", "MPR",
                                 "PROJECTION IMAGE", "MIP"])
    require_axial: bool = True
    min_slices: int = 16
    slice_thickness_min_mm: float = 0.4
    slice_thickness_max_mm: float = 10.0
    require_head: bool = True
    head_patterns: list[str] = field(
        default_factory=lambda: [r"head", r"brain", r"skull", r"cran", r"cerebr", r"neuro",
                                 r"\bsch[aä]del", r"\bkopf", r"\bt[eê]te", r"\bcabeza",
                                 r"\bcranio", r"\bhirn", r"\bstroke"])
    exclude_contrast: bool = True
    prefer: str = "thinnest-soft-tissue"
    soft_tissue_kernel: str = (
        r"^(H[0-4]\d[a-z]?|J[0-4]\d[a-z]?|Hr[0-4]\d|Qr[0-4]\d|Br[0-4]\d|B[0-4]\d[a-z]?|"
        r"FC[0-4]\d|UB|UA|EC|STANDARD|SOFT|BRAIN|HEAD|STND|SMOOTH|NORMAL|A|B|C)\b")


@dataclass
class ModelConfig:
    """The checkpoint and how inference runs."""

    checkpoint: str = ""
    # backbone base weights the checkpoint was trained on, when the checkpoint does not ship
    # them: a file, a directory (published layout) or "hf://org/name" from the offline HF cache
    weights: str = ""
    device: str = "cpu"
    workers: int = 1
    isolation: str = "process"
    job_lease_s: float = 600.0
    job_timeout_s: float = 540.0
    # bound on any volume the reader or the recipe resamples (voxels; float32 = 4 bytes each)
    max_resampled_voxels: int = 512 * 512 * 2048
    # shadow mode: further checkpoints run on the same series after the primary; results are
    # recorded (model name + version), never reported or sent (docs/operations.md)
    shadow: list["ShadowModel"] = field(default_factory=list)


@dataclass
class ShadowModel:
    """One `[[model.shadow]]` checkpoint (silent validation next to the primary model)."""

    name: str = ""
    checkpoint: str = ""
    weights: str = ""


@dataclass
class Destination:
    """A DICOM node that receives the results (SR, optional SC) by C-STORE."""

    name: str = ""
    ae_title: str = ""
    host: str = "127.0.0.1"
    port: int = 104
    tls: bool = False
    calling_ae_title: str = ""


@dataclass
class RetryConfig:
    """Bounded retries for inference jobs; unbounded (backed-off) retries for exports."""

    max_attempts: int = 3
    job_retry_delay_s: float = 30.0
    export_backoff_base_s: float = 5.0
    export_backoff_max_s: float = 900.0


@dataclass
class AuditConfig:
    """What the audit database keeps and for how long."""

    store_phi: bool = False
    retention_days: int = 0


@dataclass
class MetricsConfig:
    """Prometheus metrics over HTTP."""

    port: int = 0
    host: str = "127.0.0.1"


@dataclass
class DashboardConfig:
    """The read-only web dashboard (node/dashboard.py). Loopback by default; port 0 = off."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8470
    # access control: a bearer token ("Authorization: Bearer T" or ?token=T), and/or HTTP basic
    # auth; one of them is required on a non-loopback host
    token: str = ""
    username: str = ""
    password: str = ""


#: `notifications.channels[].kind` values.
CHANNEL_KINDS = ("webhook", "hl7-mllp")


@dataclass
class NotifyChannel:
    """Where a critical-finding notification goes: an HTTP webhook or HL7 v2 over MLLP."""

    name: str = ""
    kind: str = ""
    # webhook: POST JSON to `url`, signed with HMAC-SHA256 of the body under `secret`
    url: str = ""
    secret: str = ""
    # hl7-mllp: ORU^R01 to host:port, MSA-1 AA = delivered, AE = retried, AR = rejected
    host: str = ""
    port: int = 0
    sending_application: str = "MOLRE"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    timeout_s: float = 10.0


@dataclass
class NotifyRule:
    """finding -> threshold / decision -> channels."""

    finding: str = ""  # a catalog key, or "*" for every finding
    # 0 = the model's decision (Present); above 0 = probability >= threshold
    threshold: float = 0.0
    channels: list[str] = field(default_factory=list)


@dataclass
class NotificationsConfig:
    """Critical-finding notifications (outbox: durable rows, claimed, retried, audited)."""

    enabled: bool = False
    channels: list[NotifyChannel] = field(default_factory=list)
    rules: list[NotifyRule] = field(default_factory=list)
    backoff_base_s: float = 5.0
    backoff_max_s: float = 900.0


@dataclass
class ReportConfig:
    """The result objects sent to destinations."""

    secondary_capture: bool = False
    #: evidence images: key slices of each Present finding with the model's saliency overlaid
    #: (Secondary Capture, series 9903), referenced from the SR (node/evidence.py)
    evidence: bool = False
    evidence_key_images: int = 3
    manufacturer: str = "molre-node project"
    institution_name: str = ""
    device_name: str = "MOLRE-NODE"


@dataclass
class LoggingConfig:
    """Service logging."""

    json: bool = True
    level: str = "INFO"


#: What one node process can run (`node.roles`, `serve --roles`).
ROLES = ("receive", "assemble", "infer", "dispatch")


@dataclass
class NodeSection:
    """This node among several on one database (docs/operations.md, "Several nodes")."""

    name: str = ""  # empty = the host name; recorded on what the node owns
    roles: list[str] = field(default_factory=lambda: list(ROLES))


@dataclass
class NodeConfig:
    """The whole node configuration (one TOML table per section)."""

    network: NetworkConfig = field(default_factory=NetworkConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    assembler: AssemblerConfig = field(default_factory=AssemblerConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    destinations: list[Destination] = field(default_factory=list)
    retry: RetryConfig = field(default_factory=RetryConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    node: NodeSection = field(default_factory=NodeSection)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)
    notifications: NotificationsConfig = field(default_factory=NotificationsConfig)
    source: str = field(default="", metadata={"internal": True})

    @property
    def node_name(self) -> str:
        """`node.name`, or the host name when it is empty."""
        import socket

        return self.node.name or socket.gethostname() or "molre-node"

    def has_role(self, role: str) -> bool:
        return role in self.node.roles

    # -- derived paths ---------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return Path(self.storage.data_dir)

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL: `storage.database_url`, or SQLite `<data_dir>/molre.db`."""
        if self.storage.database_url:
            return self.storage.database_url
        return f"sqlite:///{(self.data_dir / 'molre.db').resolve()}"

    @property
    def checkpoint_path(self) -> Path | None:
        return Path(self.model.checkpoint) if self.model.checkpoint else None

    def destination(self, name: str) -> Destination | None:
        for d in self.destinations:
            if d.name == name:
                return d
        return None

    def size_limit(self, key: str) -> int:
        """A byte size key (`storage.max_instance_size`, `network.max_associate_rq_size`...)."""
        section, name = key.split(".")
        return _parse_size(getattr(getattr(self, section), name), 0, key)

    def free_disk_threshold(self, total_bytes: int) -> int:
        """Bytes that must stay free on the spool's disk, from `storage.min_free_disk`."""
        return _parse_size(self.storage.min_free_disk, total_bytes, "storage.min_free_disk")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source", None)
        return d

    def public_dict(self) -> dict[str, Any]:
        """`to_dict()` with every secret masked (database password, dashboard token and
        password, webhook secrets): what config-check --show and the dashboard display."""
        from storage.db import mask_url

        d = self.to_dict()
        if d["storage"].get("database_url"):
            d["storage"]["database_url"] = mask_url(d["storage"]["database_url"])
        for name in ("token", "password"):
            if d["dashboard"].get(name):
                d["dashboard"][name] = "***"
        for ch in d["notifications"]["channels"]:
            if ch.get("secret"):
                ch["secret"] = "***"
        return d


# ---------------------------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return {int: "integer", float: "number", bool: "boolean (true/false)", str: "string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` (no silent conversions except int -> float)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return _build(tp, value, key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            rng = " 1..65535" if key.endswith(".port") else ""
            raise ConfigError(f"{key}: expected integer{rng}, got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected number, got {_show(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected string, got {_show(value)}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover


def _show(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value)


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{key}: unknown key (known keys here: {known})")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def _parse_size(text: str, total: int, key: str) -> int:
    s = str(text).strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", s)
    if m:
        pct = float(m.group(1))
        if pct > 100:
            raise ConfigError(f"{key}: percentage must be 0..100, got \"{text}\"")
        return int(total * pct / 100.0)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?", s, flags=re.IGNORECASE)
    if not m:
        raise ConfigError(
            f"{key}: expected bytes (\"500MB\", \"2GiB\", \"1048576\") or a percentage "
            f"(\"5%\"), got \"{text}\"")
    num = float(m.group(1))
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}[unit[0]]
    return int(num * mult)


def _check_ae(value: str, key: str, allow_star: bool = False) -> None:
    if allow_star and value == "*":
        return
    if not _AE_RE.match(value) or not value.strip():
        raise ConfigError(f"{key}: expected an AE title of 1..16 printable characters without "
                          f"backslash, got {_show(value)}")


def _check_port(value: int, key: str, allow_zero: bool = False) -> None:
    lo = 0 if allow_zero else 1
    if not lo <= value <= 65535:
        raise ConfigError(f"{key}: expected integer {lo}..65535, got {value}")


def _check_positive(value: float, key: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: expected a {'non-negative' if allow_zero else 'positive'} "
                          f"number, got {value}")


def _check_regex(pattern: str, key: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{key}: invalid regular expression {_show(pattern)}: {exc}") from None


def validate(cfg: NodeConfig) -> NodeConfig:
    """Check value ranges and cross-field rules; raise ConfigError naming the key."""
    n = cfg.network
    _check_ae(n.ae_title, "network.ae_title")
    _check_port(n.port, "network.port", allow_zero=True)  # 0 = pick a free port (tests)
    if n.max_associations < 1:
        raise ConfigError(f"network.max_associations: expected integer >= 1, got "
                          f"{n.max_associations}")
    if not 0 <= n.receiver_processes <= 64:
        raise ConfigError(f"network.receiver_processes: expected an integer 0..64 (0 = one "
                          f"per core), got {n.receiver_processes}")
    for name in ("acse_timeout_s", "dimse_timeout_s", "network_timeout_s"):
        _check_positive(getattr(n, name), f"network.{name}")
    if not 0 <= n.max_associations_per_host <= n.max_associations:
        raise ConfigError(f"network.max_associations_per_host: expected 0 (= half of "
                          f"max_associations) or 1..{n.max_associations}, got "
                          f"{n.max_associations_per_host}")
    if n.refusal_audit_per_minute < 0:
        raise ConfigError(f"network.refusal_audit_per_minute: expected integer >= 0, got "
                          f"{n.refusal_audit_per_minute}")
    for key, low in (("network.max_associate_rq_size", 4096),
                     ("storage.max_instance_size", 1024),
                     ("storage.max_inflated_size", 1024)):
        section, name = key.split(".")
        text = getattr(getattr(cfg, section), name)
        if "%" in str(text) or _parse_size(text, 0, key) < low:
            raise ConfigError(f"{key}: expected a size of at least {low} bytes (\"256KiB\", "
                              f"\"1GiB\"), got {_show(text)}")
    for i, c in enumerate(n.allowed_callers):
        _check_ae(c.ae_title, f"network.allowed_callers[{i}].ae_title", allow_star=True)
        if c.host:
            try:
                ipaddress.ip_network(c.host, strict=False)
            except ValueError:
                raise ConfigError(
                    f"network.allowed_callers[{i}].host: expected an IP address or CIDR network "
                    f"(\"10.0.0.0/8\"), got {_show(c.host)}") from None
    t = cfg.tls
    if t.enabled:
        for name in ("certificate", "key"):
            if not getattr(t, name):
                raise ConfigError(f"tls.{name}: required when tls.enabled = true")
        if t.require_client_certificate and not t.ca:
            raise ConfigError("tls.ca: required when tls.require_client_certificate = true")
    _parse_size(cfg.storage.min_free_disk, 100, "storage.min_free_disk")
    if not cfg.storage.data_dir:
        raise ConfigError("storage.data_dir: must not be empty")
    if cfg.storage.durability not in DURABILITY_MODES:
        raise ConfigError(f"storage.durability: expected one of {', '.join(DURABILITY_MODES)}, "
                          f"got {_show(cfg.storage.durability)} (\"fsync\" = safe against power "
                          f"loss, \"os\" = faster, safe against a crash of the node only)")
    a = cfg.assembler
    _check_positive(a.quiet_time_s, "assembler.quiet_time_s")
    _check_positive(a.release_grace_s, "assembler.release_grace_s", allow_zero=True)
    _check_positive(a.poll_interval_s, "assembler.poll_interval_s")
    s = cfg.selection
    if s.min_slices < 1:
        raise ConfigError(f"selection.min_slices: expected integer >= 1, got {s.min_slices}")
    _check_positive(s.slice_thickness_min_mm, "selection.slice_thickness_min_mm", True)
    _check_positive(s.slice_thickness_max_mm, "selection.slice_thickness_max_mm")
    if s.slice_thickness_min_mm > s.slice_thickness_max_mm:
        raise ConfigError("selection.slice_thickness_min_mm: must be <= "
                          "selection.slice_thickness_max_mm")
    for i, p in enumerate(s.head_patterns):
        _check_regex(p, f"selection.head_patterns[{i}]")
    _check_regex(s.soft_tissue_kernel, "selection.soft_tissue_kernel")
    if s.prefer not in ("thinnest-soft-tissue", "all"):
        raise ConfigError(f"selection.prefer: expected \"thinnest-soft-tissue\" or \"all\", got "
                          f"{_show(s.prefer)}")
    m = cfg.model
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", m.device):
        raise ConfigError(f"model.device: expected \"cpu\", \"cuda\" or \"cuda:N\", got "
                          f"{_show(m.device)}")
    if m.workers < 1:
        raise ConfigError(f"model.workers: expected integer >= 1, got {m.workers}")
    if m.isolation not in ("process", "thread"):
        raise ConfigError(f"model.isolation: expected \"process\" or \"thread\", got "
                          f"{_show(m.isolation)}")
    _check_positive(m.job_lease_s, "model.job_lease_s")
    _check_positive(m.job_timeout_s, "model.job_timeout_s")
    if m.max_resampled_voxels < 1:
        raise ConfigError(f"model.max_resampled_voxels: expected integer >= 1, got "
                          f"{m.max_resampled_voxels}")
    if m.job_timeout_s >= m.job_lease_s:
        raise ConfigError(f"model.job_timeout_s: must be smaller than model.job_lease_s "
                          f"({m.job_timeout_s:g} >= {m.job_lease_s:g}), or a slow job could be "
                          f"claimed twice")
    names: set[str] = set()
    for i, d in enumerate(cfg.destinations):
        if not d.name:
            raise ConfigError(f"destinations[{i}].name: required")
        if d.name in names:
            raise ConfigError(f"destinations[{i}].name: duplicate destination name {d.name!r}")
        names.add(d.name)
        _check_ae(d.ae_title, f"destinations[{i}].ae_title")
        if d.calling_ae_title:
            _check_ae(d.calling_ae_title, f"destinations[{i}].calling_ae_title")
        _check_port(d.port, f"destinations[{i}].port")
        if not d.host:
            raise ConfigError(f"destinations[{i}].host: required")
    r = cfg.retry
    if r.max_attempts < 1:
        raise ConfigError(f"retry.max_attempts: expected integer >= 1, got {r.max_attempts}")
    _check_positive(r.job_retry_delay_s, "retry.job_retry_delay_s", True)
    _check_positive(r.export_backoff_base_s, "retry.export_backoff_base_s")
    _check_positive(r.export_backoff_max_s, "retry.export_backoff_max_s")
    if r.export_backoff_base_s > r.export_backoff_max_s:
        raise ConfigError("retry.export_backoff_base_s: must be <= retry.export_backoff_max_s")
    if cfg.audit.retention_days < 0:
        raise ConfigError(f"audit.retention_days: expected integer >= 0 (0 = keep forever), got "
                          f"{cfg.audit.retention_days}")
    _check_port(cfg.metrics.port, "metrics.port", allow_zero=True)
    if cfg.logging.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"logging.level: expected DEBUG, INFO, WARNING or ERROR, got "
                          f"{_show(cfg.logging.level)}")
    if not re.fullmatch(r"[A-Za-z0-9._:@-]{0,128}", cfg.node.name):
        raise ConfigError(f"node.name: expected up to 128 letters, digits or . _ : @ -, got "
                          f"{_show(cfg.node.name)}")
    _validate_extras(cfg)
    bad = [r for r in cfg.node.roles if r not in ROLES]
    if bad or not cfg.node.roles:
        raise ConfigError(f"node.roles: expected a non-empty subset of {', '.join(ROLES)}, got "
                          f"{cfg.node.roles!r}")
    return cfg


def _validate_extras(cfg: NodeConfig) -> None:
    """Shadow models, dashboard and notifications."""
    names: set[str] = set()
    for i, sm in enumerate(cfg.model.shadow):
        if not sm.name or not re.fullmatch(r"[A-Za-z0-9._:@+-]{1,64}", sm.name):
            raise ConfigError(f"model.shadow[{i}].name: expected 1..64 letters, digits or "
                              f". _ : @ + -, got {_show(sm.name)}")
        if sm.name in names:
            raise ConfigError(f"model.shadow[{i}].name: duplicate shadow model {sm.name!r}")
        names.add(sm.name)
        if not sm.checkpoint:
            raise ConfigError(f"model.shadow[{i}].checkpoint: required (a checkpoint directory "
                              f"or \"demo\")")
    if not 1 <= cfg.report.evidence_key_images <= 20:
        raise ConfigError(f"report.evidence_key_images: expected an integer 1..20 (key images "
                          f"per Present finding), got {cfg.report.evidence_key_images}")
    d = cfg.dashboard
    _check_port(d.port, "dashboard.port", allow_zero=True)
    if bool(d.username) != bool(d.password):
        raise ConfigError("dashboard.username / dashboard.password: set both (HTTP basic auth) "
                          "or neither")
    if d.enabled and d.port and not _is_loopback(d.host) and not (d.token or d.username):
        raise ConfigError(f"dashboard.token: required (or dashboard.username + password) when "
                          f"dashboard.host = {_show(d.host)} is not a loopback address")
    nt = cfg.notifications
    _check_positive(nt.backoff_base_s, "notifications.backoff_base_s")
    _check_positive(nt.backoff_max_s, "notifications.backoff_max_s")
    if nt.backoff_base_s > nt.backoff_max_s:
        raise ConfigError("notifications.backoff_base_s: must be <= notifications.backoff_max_s")
    channels: set[str] = set()
    for i, c in enumerate(nt.channels):
        key = f"notifications.channels[{i}]"
        if not c.name:
            raise ConfigError(f"{key}.name: required")
        if c.name in channels:
            raise ConfigError(f"{key}.name: duplicate channel name {c.name!r}")
        channels.add(c.name)
        if c.kind not in CHANNEL_KINDS:
            raise ConfigError(f"{key}.kind: expected one of {', '.join(CHANNEL_KINDS)}, got "
                              f"{_show(c.kind)}")
        if c.kind == "webhook":
            if not re.match(r"https?://", c.url):
                raise ConfigError(f"{key}.url: expected an http:// or https:// URL, got "
                                  f"{_show(c.url)}")
            if not c.secret:
                raise ConfigError(f"{key}.secret: required (the HMAC-SHA256 key the receiver "
                                  f"verifies the X-Molre-Signature header with)")
        else:
            if not c.host:
                raise ConfigError(f"{key}.host: required for kind = \"hl7-mllp\"")
            _check_port(c.port, f"{key}.port")
        _check_positive(c.timeout_s, f"{key}.timeout_s")
    for i, r in enumerate(nt.rules):
        key = f"notifications.rules[{i}]"
        if not r.finding:
            raise ConfigError(f"{key}.finding: required (a catalog key or \"*\")")
        if not 0.0 <= r.threshold <= 1.0:
            raise ConfigError(f"{key}.threshold: expected 0 (= the model's decision) or a "
                              f"probability 0..1, got {r.threshold}")
        if not r.channels:
            raise ConfigError(f"{key}.channels: name at least one channel")
        for ch in r.channels:
            if ch not in channels:
                raise ConfigError(f"{key}.channels: unknown channel {ch!r} (channels: "
                                  f"{', '.join(sorted(channels)) or 'none'})")
    if nt.enabled and not nt.rules:
        raise ConfigError("notifications.rules: notifications.enabled = true needs at least one "
                          "[[notifications.rules]] entry")


def _is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(cfg: NodeConfig) -> None:
    """Refuse to serve everyone on a reachable address by accident: a non-loopback
    `network.host` needs an allow-list, or `network.allow_any_caller = true` said explicitly.
    Checked when the node starts (not by every command that reads the config)."""
    n = cfg.network
    if n.allowed_callers or n.allow_any_caller or _is_loopback(n.host):
        return
    raise ConfigError(f"network.allowed_callers: empty while network.host = {_show(n.host)} is "
                      f"not a loopback address, so every host that can reach the port could "
                      f"store data; add [[network.allowed_callers]] entries (AE title + IP/CIDR) "
                      f"or set network.allow_any_caller = true to admit every caller on purpose")


def _resolve_paths(cfg: NodeConfig, base: Path) -> None:
    def fix(p: str) -> str:
        return str((base / p).resolve()) if p and not Path(p).is_absolute() else p

    cfg.storage.data_dir = fix(cfg.storage.data_dir)
    if cfg.model.checkpoint != "demo" or (base / "demo").exists():  # "demo" = the packaged one
        cfg.model.checkpoint = fix(cfg.model.checkpoint)
    if not cfg.model.weights.startswith("hf://"):  # an offline-cache reference is not a path
        cfg.model.weights = fix(cfg.model.weights)
    for sm in cfg.model.shadow:
        if sm.checkpoint != "demo" or (base / "demo").exists():
            sm.checkpoint = fix(sm.checkpoint)
        if not sm.weights.startswith("hf://"):
            sm.weights = fix(sm.weights)
    for name in ("certificate", "key", "ca"):
        setattr(cfg.tls, name, fix(getattr(cfg.tls, name)))


def config_from_dict(data: dict[str, Any], base_dir: Path | None = None,
                     source: str = "") -> NodeConfig:
    """Build and validate a NodeConfig from a TOML-shaped dict."""
    cfg = _build(NodeConfig, data, "")
    cfg.source = source
    if base_dir is not None:
        _resolve_paths(cfg, base_dir)
    return validate(cfg)


def load_config(path: Path | str | None = None) -> NodeConfig:
    """Load the TOML file at `path` (None = embedded defaults) and validate it."""
    if path is None:
        return config_from_dict({}, base_dir=Path.cwd(), source="<defaults>")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: configuration file not found (pass --config FILE; see "
                          f"config.example.toml)")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    try:
        return config_from_dict(data, base_dir=p.resolve().parent, source=str(p))
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None


def iter_keys(cls: type = NodeConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the config schema (lists of tables use `name[]`)."""
    out: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        tp = hints[f.name]
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(tp):
            out += iter_keys(tp, key)
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            out += iter_keys(typing.get_args(tp)[0], key + "[]")
        else:
            out.append(key)
    return out


def with_overrides(cfg: NodeConfig, *, port: int | None = None,
                   data_dir: str | Path | None = None,
                   roles: str | None = None) -> NodeConfig:
    """Apply CLI overrides (`--port`, `--data-dir`, `--roles a,b`) and re-validate."""
    if roles is not None:
        cfg.node.roles = [r.strip() for r in roles.split(",") if r.strip()]
    if port is not None:
        cfg.network.port = port
    if data_dir is not None:
        cfg.storage.data_dir = str(Path(data_dir).resolve())
    return validate(cfg)


__all__ = [
    "CHANNEL_KINDS", "DashboardConfig", "NotificationsConfig", "NotifyChannel", "NotifyRule",
    "ShadowModel",
    "DURABILITY_MODES", "AllowedCaller", "AssemblerConfig", "AuditConfig", "Destination",
    "LoggingConfig",
    "MetricsConfig", "ModelConfig", "NetworkConfig", "NodeConfig", "NodeSection", "ROLES",
    "ReportConfig",
    "RetryConfig", "SelectionConfig", "StorageConfig", "TLSConfig", "check_exposure",
    "config_from_dict",
    "iter_keys", "load_config", "validate", "with_overrides",
]

