"""Decision rules: one file per policy, one interface (base.Policy)."""
