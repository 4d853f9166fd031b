"""The creator economy: licence fees, early access, unlocks and contributions, receipts and earnings."""
