"""What the publisher (:mod:`edgeadapt.ship.repo`) and the device (:mod:`edgeadapt.ship.sync`) agree on about a
repository's targets, with no tuf import: an adapter's target path ``<fp16>/<name>/<name>-v<version>.gguf``
(the first 16 hex digits of the base fingerprint, so one repository serves many bases) and the key of the
edgeadapt entry in a target's ``custom`` metadata."""

from __future__ import annotations

import re

TARGET_RE = re.compile(r"([0-9a-f]{16})/([A-Za-z0-9][A-Za-z0-9._-]{0,63})/\2-v(\d{1,10})\.gguf")
CUSTOM_KEY = "edgeadapt"


def target_path(fingerprint: str, name: str, version: int) -> str:
    """The TUF target path of an adapter: ``<fp16>/<name>/<name>-v<version>.gguf``."""
    return f"{fingerprint.split(':')[-1][:16]}/{name}/{name}-v{version}.gguf"
