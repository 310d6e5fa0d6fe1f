"""Pictures: per-head attention figures and offline pages."""
