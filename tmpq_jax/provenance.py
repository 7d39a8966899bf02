"""Where a figure came from: device, versions, date and the command that made it."""

from __future__ import annotations

import datetime
import sys

import jax


def provenance(command: str | None = None) -> dict:
    return {
        "device": jax.devices()[0].device_kind,
        "platform": jax.devices()[0].platform,
        "num_devices": jax.device_count(),
        "jax_version": jax.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command or " ".join(["tmpq", *sys.argv[1:]]),
    }
