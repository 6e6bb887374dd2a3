"""Shared pynetdicom plumbing: AE construction, TLS contexts, presentation contexts, C-STORE/C-ECHO.

Why one module: the receiver (SCP), the dispatcher (SCU), the tests and the benchmarks must agree
on transfer syntaxes, PDU size, timeouts and TLS set-up; keeping that in one place means a change
(say, a new transfer syntax) reaches every side at once.

Sending reads files in chunks (`STORE_SEND_CHUNKED_DATASET`) so instances go out without being
decoded and re-encoded; the presentation context is therefore chosen to match each file's own
transfer syntax.
"""

from __future__ import annotations

import ssl
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom.uid as puid
from pydicom.filereader import read_file_meta_info
from pynetdicom import (
    AE,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    _config,
)
from pynetdicom.presentation import (
    AllStoragePresentationContexts,
    PresentationContext,
    build_context,
)
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made by globals()

from common.dicom import CT_STORAGE_CLASSES  # noqa: F401 - re-exported

#: Transfer syntaxes accepted for every storage class (uncompressed first: preferred).
TRANSFER_SYNTAXES: tuple[puid.UID, ...] = (
    puid.ExplicitVRLittleEndian,
    puid.ImplicitVRLittleEndian,
    puid.DeflatedExplicitVRLittleEndian,
    puid.ExplicitVRBigEndian,
    puid.JPEGBaseline8Bit,
    puid.JPEGExtended12Bit,
    puid.JPEGLossless,
    puid.JPEGLosslessSV1,
    puid.JPEGLSLossless,
    puid.JPEGLSNearLossless,
    puid.JPEG2000Lossless,
    puid.JPEG2000,
    puid.HTJ2KLossless,
    puid.HTJ2KLosslessRPCL,
    puid.HTJ2K,
    puid.RLELossless,
)

UNCOMPRESSED = (puid.ExplicitVRLittleEndian, puid.ImplicitVRLittleEndian)


def scp_contexts() -> list[PresentationContext]:
    """Supported contexts of the node's SCP: Verification, CT + every other storage class.

    Non-CT classes are accepted (and recorded as ignored by the receiver) so a PACS forwarding a
    whole study does not see failures.
    """
    contexts = [build_context(Verification)]
    seen: set[str] = set()
    for uid in CT_STORAGE_CLASSES:
        contexts.append(build_context(uid, list(TRANSFER_SYNTAXES)))
        seen.add(uid)
    for cx in AllStoragePresentationContexts:
        abstract = cx.abstract_syntax
        if abstract is None or abstract in seen:  # None: never, pynetdicom's all have one
            continue
        seen.add(abstract)
        contexts.append(build_context(abstract, list(TRANSFER_SYNTAXES)))
    return contexts


def make_ae(
    ae_title: str,
    *,
    acse_timeout: float = 30.0,
    dimse_timeout: float = 60.0,
    network_timeout: float = 60.0,
    max_associations: int = 10,
) -> AE:
    """An AE with the project's defaults (unlimited PDU size: fewer, larger P-DATA PDUs)."""
    ae = AE(ae_title=ae_title)
    ae.maximum_pdu_size = 0
    ae.acse_timeout = acse_timeout
    ae.dimse_timeout = dimse_timeout
    ae.network_timeout = network_timeout
    ae.maximum_associations = max_associations
    return ae


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One (0002,eeee) element, Explicit VR Little Endian."""
    if vr == b"OB":
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _even(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + pad if len(raw) % 2 else raw


_IMPLEMENTATION = _meta_element(
    0x0012, b"UI", _even(PYNETDICOM_IMPLEMENTATION_UID, b"\0")
) + _meta_element(0x0013, b"SH", _even(PYNETDICOM_IMPLEMENTATION_VERSION, b" "))


def file_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and File Meta Information for a received C-STORE data set: the same
    bytes as pynetdicom's ``event.file_meta`` + ``encode_file_meta`` (its implementation UID
    and version name), built directly.

    Why: building and encoding a pydicom FileMetaDataset per instance costs more than hashing
    the whole slice (BENCHMARKS.md, ingest)."""
    body = b"".join(
        (
            _meta_element(0x0001, b"OB", b"\x00\x01"),
            _meta_element(0x0002, b"UI", _even(sop_class_uid, b"\0")),
            _meta_element(0x0003, b"UI", _even(sop_instance_uid, b"\0")),
            _meta_element(0x0010, b"UI", _even(transfer_syntax, b"\0")),
            _IMPLEMENTATION,
        )
    )
    group_length = _meta_element(0x0000, b"UL", struct.pack("<I", len(body)))
    return b"\x00" * 128 + b"DICM" + group_length + body


# ---------------------------------------------------------------------------------------------
# TLS
# ---------------------------------------------------------------------------------------------


def server_ssl_context(
    certificate: str | Path,
    key: str | Path,
    ca: str | Path | None = None,
    require_client_certificate: bool = False,
) -> ssl.SSLContext:
    """TLS context for the listener (DICOM TLS, PS3.15 B.1: TLS 1.2+)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(certificate), str(key))
    if ca:
        ctx.load_verify_locations(cafile=str(ca))
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_certificate else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_ssl_context(
    ca: str | Path | None = None,
    certificate: str | Path | None = None,
    key: str | Path | None = None,
    check_hostname: bool = False,
) -> ssl.SSLContext:
    """TLS context for sending: verify the peer against `ca`; present our certificate if given.

    Hostname checking is off by default because DICOM peers are usually addressed by IP; the CA
    still has to vouch for the peer certificate.
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = check_hostname
    if certificate and key:
        ctx.load_cert_chain(str(certificate), str(key))
    return ctx


# ---------------------------------------------------------------------------------------------
# SCU helpers
# ---------------------------------------------------------------------------------------------


class AssociationError(ConnectionError):
    """The peer could not be reached or rejected/aborted the association."""


@dataclass
class SendResult:
    """Outcome of sending a batch of files over one association."""

    statuses: list[int | None] = field(default_factory=list)  # per file; None = not sent
    errors: list[str | None] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.statuses) and all(
            s is not None and (s == 0 or 0xB000 <= s <= 0xBFFF) for s in self.statuses
        )


def _file_contexts(paths: Sequence[Path]) -> tuple[list[PresentationContext], list[tuple]]:
    metas = []
    pairs: dict[str, set[str]] = {}
    for p in paths:
        meta = read_file_meta_info(p)
        sop = str(meta.MediaStorageSOPClassUID)
        ts = str(meta.TransferSyntaxUID)
        metas.append((sop, ts))
        pairs.setdefault(sop, set()).add(ts)
    contexts: list[PresentationContext] = []
    for sop, tss in pairs.items():
        for ts in sorted(tss):
            # One context per (SOP class, transfer syntax): files are streamed as stored
            # (chunked send, no re-encoding), so the accepted syntax must be the file's own.
            # Offering several uncompressed syntaxes in one context let the peer pick Explicit
            # VR for an Implicit VR file, which then had no usable context.
            contexts.append(build_context(sop, [ts]))
    if len(contexts) > 128:
        raise ValueError(
            f"{len(contexts)} presentation contexts needed (max 128); send the "
            f"files in smaller batches"
        )
    return contexts, metas


def send_files(
    paths: Iterable[str | Path],
    host: str,
    port: int,
    called_ae: str,
    *,
    calling_ae: str = "MOLRE",
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    timeout: float = 60.0,
) -> SendResult:
    """C-STORE every file over one association; returns per-file statuses.

    Raises AssociationError when no association could be established (peer down, rejected).
    Individual failures are reported in the result (status or error), not raised.
    """
    files = [Path(p) for p in paths]
    if not files:
        return SendResult()
    contexts, metas = _file_contexts(files)
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = make_ae(calling_ae, acse_timeout=timeout, dimse_timeout=timeout, network_timeout=timeout)
    ae.requested_contexts = contexts
    t0 = time.perf_counter()
    tls_args = (ssl_context, server_hostname) if ssl_context is not None else None
    # pynetdicom hints tls_args as (SSLContext, str); a None host name (no SNI/check) works
    assoc = ae.associate(host, port, ae_title=called_ae, tls_args=tls_args)  # type: ignore[arg-type]
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
        detail = ""
        if assoc.is_rejected and assoc.acceptor.primitive is not None:
            prim = assoc.acceptor.primitive
            detail = (
                f" (result {prim.result}, source {prim.result_source}, reason {prim.diagnostic})"
            )
        ae.shutdown()
        raise AssociationError(f"association to {called_ae}@{host}:{port} {why}{detail}")
    result = SendResult()
    try:
        for path, (sop, _ts) in zip(files, metas):
            if not assoc.is_established:
                result.statuses.append(None)
                result.errors.append("association lost")
                continue
            try:
                rsp = assoc.send_c_store(path)
            except (ValueError, AttributeError) as exc:
                result.statuses.append(None)
                result.errors.append(str(exc))
                continue
            status = getattr(rsp, "Status", None) if rsp is not None else None
            result.statuses.append(int(status) if status is not None else None)
            result.errors.append(None if status is not None else "no response (timeout/abort)")
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()
    result.seconds = time.perf_counter() - t0
    return result


def echo(
    host: str,
    port: int,
    called_ae: str,
    *,
    calling_ae: str = "MOLRE",
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 10.0,
) -> int | None:
    """C-ECHO; returns the status (0 = success) or None when no association was possible."""
    ae = make_ae(calling_ae, acse_timeout=timeout, dimse_timeout=timeout, network_timeout=timeout)
    ae.add_requested_context(Verification)
    tls_args = (ssl_context, None) if ssl_context is not None else None
    try:
        # pynetdicom hints tls_args as (SSLContext, str); None (no host name check) works
        assoc = ae.associate(host, port, ae_title=called_ae, tls_args=tls_args)  # type: ignore[arg-type]
        if not assoc.is_established:
            return None
        try:
            rsp = assoc.send_c_echo()
            return int(rsp.Status) if rsp is not None and "Status" in rsp else None
        finally:
            assoc.release()
    finally:
        ae.shutdown()


__all__ = [
    "AssociationError",
    "CT_STORAGE_CLASSES",
    "SendResult",
    "TRANSFER_SYNTAXES",
    "client_ssl_context",
    "echo",
    "file_header",
    "make_ae",
    "scp_contexts",
    "send_files",
    "server_ssl_context",
]
