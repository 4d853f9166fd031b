"""Buzz metering: double-entry ledger, two-phase holds, pricing and quotes."""
