"""Frame-level bidirectional GDN: reference (`naive`) and, where available, fast kernels."""

from kernels.gdn.naive import bidirectional_gdn, gdn_scan

__all__ = ["bidirectional_gdn", "gdn_scan"]
