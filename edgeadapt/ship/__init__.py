"""Shipping delta files to devices: signatures and trust, the device store."""
