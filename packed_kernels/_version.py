# SPDX-License-Identifier: Apache-2.0
"""The package version, in one place (pyproject.toml reads it; see CHANGELOG.md's policy)."""

__version__ = "0.1.0"
