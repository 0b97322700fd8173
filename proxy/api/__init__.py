"""The HTTP binding API for platforms: tenants, pools, atomic allocation of X, audit trail,
support console. `proxy.api.server` starts it; `proxy.api.commands` adds its CLI commands."""
