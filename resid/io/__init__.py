"""Files and references: loading and saving checkpoints, the reference implementations,
parity reports."""
