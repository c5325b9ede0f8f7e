"""Operations: the preflight checks and the HTTP endpoint (health, readiness, metrics)."""
