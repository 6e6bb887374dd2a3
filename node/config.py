"""The node's one typed configuration object, loaded from TOML.

Every part of the service gets its settings passed down from here, so nothing reads files or
environment variables on its own, and a bad setting fails at start with a message naming the key
instead of failing later in the middle of a transfer.

The schema is declarative (pydantic v2 models, one per TOML table): unknown keys are refused
(`extra="forbid"`), values are not converted (strict: "10" is not a number; an integer is a
number), ranges are field constraints and rules between keys are model validators. Every error is
turned into a `ConfigError` whose lines start with the dotted key ("network.port: ...").
`key_table()` renders the reference table of docs/configuration.md from these models and
`json_schema()` gives their JSON schema (`molre-node config-schema`).

`load_config(None)` gives the embedded defaults (AE title MOLRE on 127.0.0.1:11112, data in
./molre-data, demo checkpoint, CPU). Relative paths in a config file are resolved against the
directory of that file; relative defaults (no file) against the working directory.
"""

from __future__ import annotations

import ipaddress
import json
import re
import tomllib
import typing
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from common.errors import ConfigError
from common.validation import RuleError as _KeyError
from common.validation import bounds as _bounds
from common.validation import config_error
from common.validation import show as _show
from common.validation import table_of as _table_of

#: Values of `storage.durability`: "fsync" = spool file and directory fsynced before C-STORE
#: Success (survives a power cut); "os" = in the page cache at Success (survives kill -9 only).
Durability = Literal["fsync", "os"]
DURABILITY_MODES: tuple[Durability, ...] = typing.get_args(Durability)
#: `notifications.channels[].kind` values.
ChannelKind = Literal["webhook", "hl7-mllp"]
CHANNEL_KINDS: tuple[ChannelKind, ...] = typing.get_args(ChannelKind)
#: What one node process can run (`node.roles`, `serve --roles`).
Role = Literal["receive", "assemble", "infer", "dispatch"]
ROLES: tuple[Role, ...] = typing.get_args(Role)
#: The name of the packaged demo checkpoint in `model.checkpoint` and `[[model.shadow]]`
#: (as `--checkpoint demo` on the command line; molre.checkpoint.DEMO_NAME), unless a folder of
#: that name sits next to the config file.
DEMO_CHECKPOINT = "demo"

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable, no backslash, <= 16 chars


# ---------------------------------------------------------------------------------------------
# Value types: a check with a message; the key is added where the error is reported
# ---------------------------------------------------------------------------------------------


def _ae_title(value: str) -> str:
    if not _AE_RE.match(value) or not value.strip():
        raise ValueError(
            f"expected an AE title of 1..16 printable characters without "
            f"backslash, got {_show(value)}"
        )
    return value


def _ae_title_or_star(value: str) -> str:
    return value if value == "*" else _ae_title(value)


def _regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"invalid regular expression {_show(value)}: {exc}") from None
    return value


def _network(value: str) -> str:
    if value:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ValueError(
                f'expected an IP address or CIDR network ("10.0.0.0/8"), got {_show(value)}'
            ) from None
    return value


def parse_size(text: str, total: int, key: str) -> int:
    """Bytes of a size ("500MB", "2GiB", "1048576") or a percentage of `total` ("5%")."""
    s = str(text).strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", s)
    if m:
        pct = float(m.group(1))
        if pct > 100:
            raise ConfigError(f'{key}: percentage must be 0..100, got "{text}"')
        return int(total * pct / 100.0)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?", s, flags=re.IGNORECASE)
    if not m:
        raise ConfigError(
            f'{key}: expected bytes ("500MB", "2GiB", "1048576") or a percentage '
            f'("5%"), got "{text}"'
        )
    num = float(m.group(1))
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}[unit[0]]
    return int(num * mult)


def _size_or_percent(value: str) -> str:
    try:
        parse_size(value, 100, "")
    except ConfigError as exc:
        raise ValueError(str(exc).removeprefix(": ")) from None
    return value


def _size_at_least(low: int) -> AfterValidator:
    def check(value: str) -> str:
        try:
            ok = "%" not in value and parse_size(value, 0, "") >= low
        except ConfigError:
            ok = False
        if not ok:
            raise ValueError(
                f'expected a size of at least {low} bytes ("256KiB", "1GiB"), got {_show(value)}'
            )
        return value

    return AfterValidator(check)


def _path(value: str, info: ValidationInfo) -> str:
    """Relative to the config file's directory (`context["base_dir"]`), when there is one."""
    base = (info.context or {}).get("base_dir")
    if base is None or not value or Path(value).is_absolute():
        return value
    return str((Path(base) / value).resolve())


def _weights(value: str, info: ValidationInfo) -> str:
    return value if value.startswith("hf://") else _path(value, info)  # hf:// = offline cache


def _checkpoint(value: str, info: ValidationInfo) -> str:
    """A checkpoint folder, or "demo" for the packaged demo checkpoint -- unless a folder named
    demo sits next to the config file (then that folder, as for any relative path)."""
    base = (info.context or {}).get("base_dir")
    if value == DEMO_CHECKPOINT and (base is None or not (Path(base) / value).exists()):
        return value
    return _path(value, info)


AETitle = Annotated[str, AfterValidator(_ae_title)]
Regex = Annotated[str, AfterValidator(_regex)]
FilePath = Annotated[str, AfterValidator(_path)]
Checkpoint = Annotated[str, AfterValidator(_checkpoint)]
Weights = Annotated[str, AfterValidator(_weights)]
Port = Annotated[int, Field(ge=1, le=65535)]
PortOrOff = Annotated[int, Field(ge=0, le=65535)]
Seconds = Annotated[float, Field(gt=0)]
Count = Annotated[int, Field(ge=1)]
#: a byte size as text ("256KiB", "1GiB", "1048576")
Size = Annotated[str, Field(json_schema_extra={"format": "size"})]


class _Table(BaseModel):
    """One TOML table: unknown keys refused, no silent conversions (except int -> float)."""

    # defaults are validated too: a relative default path is resolved like a written one
    model_config = ConfigDict(
        extra="forbid", strict=True, validate_default=True, use_attribute_docstrings=True
    )


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


class AllowedCaller(_Table):
    """One allow-list entry: a calling AE title and (optionally) where it may connect from."""

    ae_title: Annotated[str, AfterValidator(_ae_title_or_star)] = "*"
    """calling AE title; "*" = any (a host-only rule)"""
    host: Annotated[str, AfterValidator(_network)] = ""
    """IP address or CIDR network ("10.1.0.0/16"); "" = any host"""

    def __init__(self, ae_title: str = "*", host: str = "", **data: Any) -> None:
        fields: dict[str, Any] = {"ae_title": ae_title, "host": host, **data}
        super().__init__(**fields)  # positional use: AllowedCaller("PACS", "10/8")


class NetworkConfig(_Table):
    """DICOM listener and access control."""

    ae_title: AETitle = "MOLRE"
    """AE title of the node"""
    host: str = "127.0.0.1"
    """address to listen on (a non-loopback one needs allowed_callers or allow_any_caller)"""
    port: PortOrOff = 11112
    """DICOM port (0 = pick a free one, for tests)"""
    require_called_ae: bool = True
    """reject a called AE title that is not ae_title (0x07)"""
    allowed_callers: list[AllowedCaller] = Field(default_factory=list)
    """who may send; empty = everyone"""
    max_associations: Count = 10
    """simultaneous associations; more are rejected transiently"""
    acse_timeout_s: Seconds = 30.0
    """from TCP connect until the A-ASSOCIATE-RQ is complete (TLS included)"""
    dimse_timeout_s: Seconds = 60.0
    """wait for a DIMSE message (and grace for associations at shutdown)"""
    network_timeout_s: Seconds = 60.0
    """longest silence on an association, also inside a PDU"""
    allow_any_caller: bool = False
    """start with an empty allow-list on a non-loopback host"""
    max_associations_per_host: Annotated[int, Field(ge=0)] = 0
    """connections at once from one IP address; 0 = half of max_associations (at least 1)"""
    max_associate_rq_size: Annotated[Size, _size_at_least(4096)] = "256KiB"
    """largest A-ASSOCIATE-RQ (checked on the PDU header)"""
    refusal_audit_per_minute: Annotated[int, Field(ge=0)] = 60
    """audit rows per minute for connections refused before acceptance"""
    receiver_processes: Annotated[int, Field(ge=0, le=64)] = 1
    """processes serving associations; 1 = all in the node process, 0 = one per core (at most 4)"""

    @model_validator(mode="after")
    def _per_host_within_total(self) -> NetworkConfig:
        if self.max_associations_per_host > self.max_associations:
            raise _KeyError(
                "max_associations_per_host",
                f"expected 0 (= half of max_associations) or "
                f"1..{self.max_associations}, got {self.max_associations_per_host}",
            )
        return self

    def per_host_limit(self) -> int:
        """`max_associations_per_host`, with 0 meaning half of `max_associations`."""
        if self.max_associations_per_host:
            return self.max_associations_per_host
        return max(1, self.max_associations // 2)


class TLSConfig(_Table):
    """DICOM TLS for the listener (and default CA for destinations with tls = true)."""

    enabled: bool = False
    """DICOM TLS on the listener"""
    certificate: FilePath = ""
    """PEM certificate chain of the node"""
    key: FilePath = ""
    """PEM private key of the node"""
    ca: FilePath = ""
    """PEM CA bundle verifying clients and destinations"""
    require_client_certificate: bool = False
    """mutual TLS (needs ca)"""

    @model_validator(mode="after")
    def _complete(self) -> TLSConfig:
        if self.enabled:
            for name in ("certificate", "key"):
                if not getattr(self, name):
                    raise _KeyError(name, "required when tls.enabled = true")
            if self.require_client_certificate and not self.ca:
                raise _KeyError("ca", "required when tls.require_client_certificate = true")
        return self


class StorageConfig(_Table):
    """Where received instances, reports and the audit database live."""

    data_dir: Annotated[FilePath, Field(min_length=1)] = "./molre-data"
    """spool/ and the SQLite database molre.db"""
    database_url: str = ""
    """SQLAlchemy URL; "" = SQLite molre.db in data_dir"""
    min_free_disk: Annotated[Size, AfterValidator(_size_or_percent)] = "5%"
    """free-disk watermark: bytes ("2GiB") or a percentage; below: 0xA700"""
    max_instance_size: Annotated[Size, _size_at_least(1024)] = "1GiB"
    """largest data set on the wire; above: 0xA700"""
    max_inflated_size: Annotated[Size, _size_at_least(1024)] = "1GiB"
    """largest inflated size of a deflated data set; above: 0xA700"""
    durability: Durability = "fsync"
    '"fsync" = safe against power loss; "os" = faster, safe against a crash of the node only'


class AssemblerConfig(_Table):
    """When a series counts as complete."""

    quiet_time_s: Seconds = 10.0
    """no new instance for this long = complete"""
    release_grace_s: Annotated[float, Field(ge=0)] = 2.0
    """wait after the association released before assembling"""
    poll_interval_s: Seconds = 0.5
    """how often the assembler looks"""


_DEFAULT_HEAD_PATTERNS = [
    r"head",
    r"brain",
    r"skull",
    r"cran",
    r"cerebr",
    r"neuro",
    r"\bsch[aä]del",
    r"\bkopf",
    r"\bt[eê]te",
    r"\bcabeza",
    r"\bcranio",
    r"\bhirn",
    r"\bstroke",
]
_DEFAULT_KERNEL = (
    r"^(H[0-4]\d[a-z]?|J[0-4]\d[a-z]?|Hr[0-4]\d|Qr[0-4]\d|Br[0-4]\d|B[0-4]\d[a-z]?|"
    r"FC[0-4]\d|UB|UA|EC|STANDARD|SOFT|BRAIN|HEAD|STND|SMOOTH|NORMAL|A|B|C)\b"
)


class SelectionConfig(_Table):
    """Which complete series are read by the model (the rest are skipped with a reason)."""

    modalities: list[str] = Field(default_factory=lambda: ["CT"])
    """modalities read"""
    image_type_required: list[str] = Field(default_factory=lambda: ["ORIGINAL", "PRIMARY"])
    """Image Type values a series must have"""
    image_type_excluded: list[str] = Field(
        default_factory=lambda: [
            "LOCALIZER",
            "DERIVED",
            "SECONDARY",
            "REFORMATTED",
            "MPR",
            "PROJECTION IMAGE",
            "MIP",
        ]
    )
    """Image Type values that skip a series"""
    require_axial: bool = True
    """axial slices only"""
    min_slices: Count = 16
    """fewest slices read"""
    slice_thickness_min_mm: Annotated[float, Field(ge=0)] = 0.4
    """thinnest slices read"""
    slice_thickness_max_mm: Annotated[float, Field(gt=0)] = 10.0
    """thickest slices read"""
    require_head: bool = True
    """body part / description must match head_patterns"""
    head_patterns: list[Regex] = Field(default_factory=lambda: list(_DEFAULT_HEAD_PATTERNS))
    """regular expressions (case-insensitive) naming a head series"""
    exclude_contrast: bool = True
    """skip series with a contrast agent"""
    prefer: Literal["thinnest-soft-tissue", "all"] = "thinnest-soft-tissue"
    """one series per study, or every eligible one"""
    soft_tissue_kernel: Regex = _DEFAULT_KERNEL
    """regular expression of soft-tissue kernels"""

    @model_validator(mode="after")
    def _thickness_order(self) -> SelectionConfig:
        if self.slice_thickness_min_mm > self.slice_thickness_max_mm:
            raise _KeyError("slice_thickness_min_mm", "must be <= selection.slice_thickness_max_mm")
        return self


class ShadowModel(_Table):
    """One `[[model.shadow]]` checkpoint (silent validation next to the primary model)."""

    name: str = ""
    """recorded with the results (1..64 letters, digits, ._:@+-)"""
    checkpoint: Checkpoint = ""
    'a checkpoint folder or "demo"'
    weights: Weights = ""
    """backbone base weights, as model.weights"""

    @model_validator(mode="after")
    def _named(self) -> ShadowModel:
        if not re.fullmatch(r"[A-Za-z0-9._:@+-]{1,64}", self.name):
            raise _KeyError(
                "name", f"expected 1..64 letters, digits or . _ : @ + -, got {_show(self.name)}"
            )
        if not self.checkpoint:
            raise _KeyError("checkpoint", 'required (a checkpoint directory or "demo")')
        return self


class ModelConfig(_Table):
    """The checkpoint and how inference runs."""

    checkpoint: Checkpoint = ""
    """checkpoint folder; "" or "demo" = the packaged demo checkpoint"""
    weights: Weights = ""
    """backbone base weights when the checkpoint has none: a file, a folder or "hf://org/name"
    (offline cache)"""
    device: Annotated[str, Field(pattern=r"^(cpu|cuda(:\d+)?|mps)$")] = "cpu"
    '"cpu", "cuda", "cuda:N" or "mps"'
    workers: Count = 1
    """inference workers"""
    isolation: Literal["process", "thread"] = "process"
    """inference in a child process or a thread"""
    job_lease_s: Seconds = 600.0
    """a claimed job is taken over after this"""
    job_timeout_s: Seconds = 540.0
    """longest inference (below job_lease_s)"""
    max_resampled_voxels: Count = 512 * 512 * 2048
    """bound on any resampled volume (voxels)"""
    shadow: list[ShadowModel] = Field(default_factory=list)
    """checkpoints run after the primary; recorded, never reported"""

    @model_validator(mode="after")
    def _rules(self) -> ModelConfig:
        if self.job_timeout_s >= self.job_lease_s:
            raise _KeyError(
                "job_timeout_s",
                f"must be smaller than model.job_lease_s ({self.job_timeout_s:g} >= "
                f"{self.job_lease_s:g}), or a slow job could be claimed twice",
            )
        seen: set[str] = set()
        for i, sm in enumerate(self.shadow):
            if sm.name in seen:
                raise _KeyError(f"shadow[{i}].name", f"duplicate shadow model {sm.name!r}")
            seen.add(sm.name)
        return self


class Destination(_Table):
    """A DICOM node that receives the results (SR, optional SC) by C-STORE."""

    name: Annotated[str, Field(min_length=1)] = ""
    """name (unique)"""
    ae_title: AETitle = ""
    """called AE title"""
    host: Annotated[str, Field(min_length=1)] = "127.0.0.1"
    """host"""
    port: Port = 104
    """port"""
    tls: bool = False
    """DICOM TLS (tls.ca verifies the peer)"""
    calling_ae_title: str = ""
    """our AE title towards it; "" = network.ae_title"""

    @model_validator(mode="after")
    def _calling(self) -> Destination:
        if self.calling_ae_title:
            try:
                _ae_title(self.calling_ae_title)
            except ValueError as exc:
                raise _KeyError("calling_ae_title", str(exc)) from None
        return self


class RetryConfig(_Table):
    """Bounded retries for inference jobs; unbounded (backed-off) retries for exports."""

    max_attempts: Count = 3
    """inference attempts of a job"""
    job_retry_delay_s: Annotated[float, Field(ge=0)] = 30.0
    """wait before a failed job is tried again"""
    export_backoff_base_s: Seconds = 5.0
    """first wait after a failed send (doubles)"""
    export_backoff_max_s: Seconds = 900.0
    """longest wait between sends"""

    @model_validator(mode="after")
    def _order(self) -> RetryConfig:
        if self.export_backoff_base_s > self.export_backoff_max_s:
            raise _KeyError("export_backoff_base_s", "must be <= retry.export_backoff_max_s")
        return self


class AuditConfig(_Table):
    """What the audit database keeps and for how long."""

    store_phi: bool = False
    """keep patient name/ID in the audit database"""
    retention_days: Annotated[int, Field(ge=0)] = 0
    """0 = keep forever"""


class MetricsConfig(_Table):
    """Prometheus metrics over HTTP."""

    port: PortOrOff = 0
    """0 = off"""
    host: str = "127.0.0.1"
    """address of the metrics endpoint"""


def _is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


class DashboardConfig(_Table):
    """The read-only web dashboard (node/dashboard.py). Loopback by default; port 0 = off."""

    enabled: bool = True
    """serve the dashboard"""
    host: str = "127.0.0.1"
    """address (non-loopback needs token or username)"""
    port: PortOrOff = 8470
    """0 = off"""
    token: str = ""
    """bearer token (Authorization: Bearer T or ?token=T)"""
    username: str = ""
    """HTTP basic auth user (with password)"""
    password: str = ""
    """HTTP basic auth password"""

    @model_validator(mode="after")
    def _access(self) -> DashboardConfig:
        if bool(self.username) != bool(self.password):
            raise _KeyError(
                "username / dashboard.password", "set both (HTTP basic auth) or neither"
            )
        if (
            self.enabled
            and self.port
            and not _is_loopback(self.host)
            and not (self.token or self.username)
        ):
            raise _KeyError(
                "token",
                f"required (or dashboard.username + password) when "
                f"dashboard.host = {_show(self.host)} is not a loopback "
                f"address",
            )
        return self


class NotifyChannel(_Table):
    """Where a critical-finding notification goes: an HTTP webhook or HL7 v2 over MLLP."""

    name: Annotated[str, Field(min_length=1)] = ""
    """name (unique)"""
    kind: ChannelKind
    """webhook = HTTP POST of JSON; hl7-mllp = HL7 v2 ORU^R01 over MLLP"""
    url: str = ""
    """webhook: http(s) URL the JSON is POSTed to"""
    secret: str = ""
    """webhook: HMAC-SHA256 key of X-Molre-Signature"""
    host: str = ""
    """hl7-mllp: host"""
    port: PortOrOff = 0
    """hl7-mllp: port"""
    sending_application: str = "MOLRE"
    """hl7-mllp: MSH-3"""
    sending_facility: str = ""
    """hl7-mllp: MSH-4"""
    receiving_application: str = ""
    """hl7-mllp: MSH-5"""
    receiving_facility: str = ""
    """hl7-mllp: MSH-6"""
    timeout_s: Seconds = 10.0
    """per delivery attempt"""

    @model_validator(mode="after")
    def _complete(self) -> NotifyChannel:
        if self.kind == "webhook":
            if not re.match(r"https?://", self.url):
                raise _KeyError(
                    "url", f"expected an http:// or https:// URL, got {_show(self.url)}"
                )
            if not self.secret:
                raise _KeyError(
                    "secret",
                    "required (the HMAC-SHA256 key the receiver verifies "
                    "the X-Molre-Signature header with)",
                )
        else:
            if not self.host:
                raise _KeyError("host", 'required for kind = "hl7-mllp"')
            if not 1 <= self.port <= 65535:
                raise _KeyError("port", f"expected an integer 1..65535, got {self.port}")
        return self


class NotifyRule(_Table):
    """finding -> threshold / decision -> channels."""

    finding: Annotated[str, Field(min_length=1)] = ""
    """a catalog key, or "*" for every finding"""
    threshold: Annotated[float, Field(ge=0, le=1)] = 0.0
    """0 = the model's decision (Present); above 0 = probability >= it"""
    channels: Annotated[list[str], Field(min_length=1)] = Field(default_factory=list)
    """channel names"""


class NotificationsConfig(_Table):
    """Critical-finding notifications (outbox: durable rows, claimed, retried, audited)."""

    enabled: bool = False
    """send notifications"""
    channels: list[NotifyChannel] = Field(default_factory=list)
    """where they go"""
    rules: list[NotifyRule] = Field(default_factory=list)
    """what is sent where"""
    backoff_base_s: Seconds = 5.0
    """first wait after a failed delivery"""
    backoff_max_s: Seconds = 900.0
    """longest wait between deliveries"""

    @model_validator(mode="after")
    def _rules(self) -> NotificationsConfig:
        if self.backoff_base_s > self.backoff_max_s:
            raise _KeyError("backoff_base_s", "must be <= notifications.backoff_max_s")
        names: set[str] = set()
        for i, c in enumerate(self.channels):
            if c.name in names:
                raise _KeyError(f"channels[{i}].name", f"duplicate channel name {c.name!r}")
            names.add(c.name)
        for i, r in enumerate(self.rules):
            for ch in r.channels:
                if ch not in names:
                    raise _KeyError(
                        f"rules[{i}].channels",
                        f"unknown channel {ch!r} (channels: {', '.join(sorted(names)) or 'none'})",
                    )
        if self.enabled and not self.rules:
            raise _KeyError(
                "rules",
                "notifications.enabled = true needs at least one [[notifications.rules]] entry",
            )
        return self


class ReportConfig(_Table):
    """The result objects sent to destinations."""

    secondary_capture: bool = False
    """also send a Secondary Capture summary"""
    evidence: bool = False
    """key images of each Present finding with the saliency overlaid (series 9903)"""
    evidence_key_images: Annotated[int, Field(ge=1, le=20)] = 3
    """key images per Present finding"""
    manufacturer: str = "molre-node project"
    """SR Manufacturer"""
    institution_name: str = ""
    """SR Institution Name"""
    device_name: str = "MOLRE-NODE"
    """SR Manufacturer's Model Name"""


with warnings.catch_warnings():
    # the TOML key `json` shadows BaseModel.json (deprecated in pydantic v2, not used here)
    warnings.filterwarnings("ignore", message='Field name "json"', category=UserWarning)

    class LoggingConfig(_Table):
        """Service logging."""

        json: bool = True  # type: ignore[assignment]
        """JSON lines (false = console format)"""
        level: Annotated[str, Field(pattern=r"(?i)^(debug|info|warning|error)$")] = "INFO"
        """DEBUG, INFO, WARNING or ERROR"""


class NodeSection(_Table):
    """This node among several on one database (docs/operations.md, "Several nodes")."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9._:@-]{0,128}$")] = ""
    """up to 128 letters, digits or . _ : @ - ("" = the host name)"""
    roles: Annotated[list[Role], Field(min_length=1)] = Field(default_factory=lambda: list(ROLES))
    """what this process runs"""


class NodeConfig(_Table):
    """The whole node configuration (one TOML table per section)."""

    network: NetworkConfig = Field(default_factory=lambda: NetworkConfig())
    tls: TLSConfig = Field(default_factory=lambda: TLSConfig())
    storage: StorageConfig = Field(default_factory=lambda: StorageConfig())
    assembler: AssemblerConfig = Field(default_factory=lambda: AssemblerConfig())
    selection: SelectionConfig = Field(default_factory=lambda: SelectionConfig())
    model: ModelConfig = Field(default_factory=lambda: ModelConfig())
    destinations: list[Destination] = Field(default_factory=list)
    retry: RetryConfig = Field(default_factory=lambda: RetryConfig())
    audit: AuditConfig = Field(default_factory=lambda: AuditConfig())
    metrics: MetricsConfig = Field(default_factory=lambda: MetricsConfig())
    report: ReportConfig = Field(default_factory=lambda: ReportConfig())
    logging: LoggingConfig = Field(default_factory=lambda: LoggingConfig())
    node: NodeSection = Field(default_factory=lambda: NodeSection())
    dashboard: DashboardConfig = Field(default_factory=lambda: DashboardConfig())
    notifications: NotificationsConfig = Field(default_factory=lambda: NotificationsConfig())
    _source: str = PrivateAttr("")

    @model_validator(mode="before")
    @classmethod
    def _every_table(cls, data: Any) -> Any:
        """A section left out is validated as an empty table (its paths resolved too)."""
        if isinstance(data, dict):
            tables = {
                name
                for name, info in cls.model_fields.items()
                if typing.get_origin(info.annotation) is not list
            }
            data = {**{name: {} for name in tables}, **data}
        return data

    @model_validator(mode="after")
    def _unique_destinations(self) -> NodeConfig:
        names: set[str] = set()
        for i, d in enumerate(self.destinations):
            if d.name in names:
                raise _KeyError(f"destinations[{i}].name", f"duplicate destination name {d.name!r}")
            names.add(d.name)
        return self

    @property
    def source(self) -> str:
        """The file this config was read from ("<defaults>" without one)."""
        return self._source

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

    def destination(self, name: str) -> Destination | None:
        for d in self.destinations:
            if d.name == name:
                return d
        return None

    def size_limit(self, key: str) -> int:
        """A byte size key (`storage.max_instance_size`, `network.max_associate_rq_size`...)."""
        section, name = key.split(".")
        return parse_size(getattr(getattr(self, section), name), 0, key)

    def free_disk_threshold(self, total_bytes: int) -> int:
        """Bytes that must stay free on the spool's disk, from `storage.min_free_disk`."""
        return parse_size(self.storage.min_free_disk, total_bytes, "storage.min_free_disk")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

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


def config_from_dict(
    data: dict[str, Any], base_dir: Path | None = None, source: str = ""
) -> NodeConfig:
    """Build and validate a NodeConfig from a TOML-shaped dict; relative paths resolve against
    `base_dir` (None: left as they are)."""
    if not isinstance(data, dict):
        raise ConfigError(f"expected a table of sections, got {_show(data)}")
    try:
        cfg = NodeConfig.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise config_error(exc, NodeConfig) from None
    cfg._source = source
    return cfg


def validate(cfg: NodeConfig) -> NodeConfig:
    """Validate a (changed) NodeConfig again; returns a new, checked object."""
    return config_from_dict(cfg.model_dump(), source=cfg.source)


def load_config(path: Path | str | None = None) -> NodeConfig:
    """Load the TOML file at `path` (None = embedded defaults) and validate it."""
    if path is None:
        return config_from_dict({}, base_dir=Path.cwd(), source="<defaults>")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"{p}: configuration file not found (pass --config FILE; see config.example.toml)"
        )
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    try:
        return config_from_dict(data, base_dir=p.resolve().parent, source=str(p))
    except ConfigError as exc:
        raise ConfigError("\n".join(f"{p}: {line}" for line in str(exc).splitlines())) from None


def check_exposure(cfg: NodeConfig) -> None:
    """Refuse to serve everyone on a reachable address by accident: a non-loopback
    `network.host` needs an allow-list, or `network.allow_any_caller = true` said explicitly.
    Checked when the node starts (not by every command that reads the config)."""
    n = cfg.network
    if n.allowed_callers or n.allow_any_caller or _is_loopback(n.host):
        return
    raise ConfigError(
        f"network.allowed_callers: empty while network.host = {_show(n.host)} is "
        f"not a loopback address, so every host that can reach the port could "
        f"store data; add [[network.allowed_callers]] entries (AE title + IP/CIDR) "
        f"or set network.allow_any_caller = true to admit every caller on purpose"
    )


def with_overrides(
    cfg: NodeConfig,
    *,
    port: int | None = None,
    data_dir: str | Path | None = None,
    roles: str | None = None,
) -> NodeConfig:
    """Apply CLI overrides (`--port`, `--data-dir`, `--roles a,b`) and re-validate."""
    if roles is not None:
        # any text: validate() below names a role that is not one
        cfg.node.roles = [r.strip() for r in roles.split(",") if r.strip()]  # type: ignore[misc]
    if port is not None:
        cfg.network.port = port
    if data_dir is not None:
        cfg.storage.data_dir = str(Path(data_dir).resolve())
    return validate(cfg)


# ---------------------------------------------------------------------------------------------
# The schema as data: keys, the docs' key table, JSON schema
# ---------------------------------------------------------------------------------------------


def iter_keys(cls: type[BaseModel] = NodeConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the config schema (lists of tables use `name[]`)."""
    out: list[str] = []
    for name, info in cls.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        table = _table_of(info.annotation)
        if table is None:
            out.append(key)
        elif typing.get_origin(info.annotation) is list:
            out += iter_keys(table, key + "[]")
        else:
            out += iter_keys(table, key)
    return out


def _fields(cls: type[BaseModel], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for name, info in cls.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        table = _table_of(info.annotation)
        if table is None:
            out.append((key, info))
        else:
            out += _fields(
                table, key + ("[]" if typing.get_origin(info.annotation) is list else "")
            )
    return out


def _type_text(info: Any) -> str:
    tp = info.annotation
    args = typing.get_args(tp)
    if typing.get_origin(tp) is Literal:
        return " \\| ".join(f'`"{a}"`' for a in args)
    if typing.get_origin(tp) is list:
        item = args[0]
        while typing.get_origin(item) is Annotated:
            item = typing.get_args(item)[0]
        if typing.get_origin(item) is Literal:
            return "list of " + " \\| ".join(f'`"{a}"`' for a in typing.get_args(item))
        return "list of strings"
    if isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get("format") == "size":
        return "size (text)"
    base = {int: "integer", float: "number", bool: "boolean", str: "string"}.get(tp, str(tp))
    return f"{base}{_bounds(info)}" if base in ("integer", "number") else base


def _default_text(info: Any) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    return f"`{json.dumps(value, ensure_ascii=False)}`".replace("|", "\\|")


def key_table() -> str:
    """The markdown table of every key (key, type, default, meaning) in docs/configuration.md,
    between its `config-keys` markers (tests/test_config.py checks they are equal)."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, info in _fields(NodeConfig):
        desc = " ".join((info.description or "").split()).replace("|", "\\|")
        rows.append(f"| `{key}` | {_type_text(info)} | {_default_text(info)} | {desc} |")
    return "\n".join(rows) + "\n"


def json_schema() -> dict[str, Any]:
    """JSON schema of the config file (`molre-node config-schema`)."""
    schema = NodeConfig.model_json_schema()
    schema["title"] = "molre-node configuration"
    return schema


__all__ = [
    "CHANNEL_KINDS",
    "DEMO_CHECKPOINT",
    "DURABILITY_MODES",
    "ROLES",
    "AllowedCaller",
    "AssemblerConfig",
    "AuditConfig",
    "DashboardConfig",
    "Destination",
    "LoggingConfig",
    "MetricsConfig",
    "ModelConfig",
    "NetworkConfig",
    "NodeConfig",
    "NodeSection",
    "NotificationsConfig",
    "NotifyChannel",
    "NotifyRule",
    "ReportConfig",
    "RetryConfig",
    "SelectionConfig",
    "ShadowModel",
    "StorageConfig",
    "TLSConfig",
    "check_exposure",
    "config_error",
    "config_from_dict",
    "iter_keys",
    "json_schema",
    "key_table",
    "load_config",
    "parse_size",
    "validate",
    "with_overrides",
]
