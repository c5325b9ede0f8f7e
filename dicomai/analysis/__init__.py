"""From a stable study to typed per-image analyses: scope, decode, classify."""
