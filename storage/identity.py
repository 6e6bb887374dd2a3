"""Patient identity compared without keeping it: a keyed hash of the PatientID.

Why: series are keyed by SeriesInstanceUID, and UIDs collide in the wild (buggy modalities,
anonymisers, re-imports). The receiver refuses an instance whose patient differs from its
series' (or study's) record, which needs *some* record of the patient -- but the audit database
must not hold PHI unless ``audit.store_phi`` says so. An HMAC-SHA256 of the PatientID under a
secret that never leaves the node's data dir lets the node compare patients, while the database
alone does not reveal them: without the secret, an ID cannot be tested against the stored keys
(a plain hash of a short ID could be reversed by trying every ID).

The secret is made once per install (``<data_dir>/patient-key.secret``, 32 random bytes as hex,
mode 0600). Keep it with the database: a node given the database without the secret (a restore
that forgot it) makes new keys, so an instance of a series received before would look like
another patient's and be refused until the series is pruned.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from common.errors import MolreError

SECRET_FILE = "patient-key.secret"


class PatientKeyer:
    """``key(patient_id)`` -> 64 hex characters; equal IDs give equal keys on one install."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the patient key secret must be at least 16 bytes")
        self._secret = bytes(secret)

    def key(self, patient_id: str | None) -> str:
        """The keyed hash of a PatientID (surrounding blanks ignored; absent = empty)."""
        text = (patient_id or "").strip()
        return hmac.new(
            self._secret, text.encode("utf-8", "surrogateescape"), hashlib.sha256
        ).hexdigest()

    def __repr__(self) -> str:  # never print the secret
        return "PatientKeyer(<secret>)"


def load_patient_keyer(data_dir: str | Path) -> PatientKeyer:
    """The install's keyer: reads ``<data_dir>/patient-key.secret``, creating it on first use
    (exclusive create, so two processes starting at once agree on one secret)."""
    directory = Path(data_dir)
    path = directory / SECRET_FILE
    try:
        directory.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            try:
                os.write(fd, (secrets.token_hex(32) + "\n").encode("ascii"))
                try:
                    os.fsync(fd)
                except OSError:  # a file system without fsync: the page cache will do
                    pass
            finally:
                os.close(fd)
        text = ""
        for _ in range(50):  # another process may be writing it right now
            text = path.read_text(encoding="ascii").strip()
            if text:
                break
            import time

            time.sleep(0.01)
    except OSError as exc:
        raise MolreError(
            f"{path}: cannot read or create the patient key secret "
            f"({exc.strerror or exc}); the node's data dir must be writable"
        ) from None
    try:
        secret = bytes.fromhex(text)
        return PatientKeyer(secret)
    except ValueError:
        raise MolreError(
            f"{path}: not a patient key secret (expected 64 hex digits); restore "
            f"it from the backup of this data dir, or delete it to start a new "
            f"one (series received before will then look like other patients')"
        ) from None


__all__ = ["SECRET_FILE", "PatientKeyer", "load_patient_keyer"]
