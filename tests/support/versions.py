"""The installed versions the tests branch on (each CI leg runs one Axolotl line)."""

from __future__ import annotations

from importlib.metadata import version

from packaging.version import Version

AXOLOTL = Version(version("axolotl"))
AXOLOTL_021 = Version("0.21") <= AXOLOTL
