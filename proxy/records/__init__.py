"""Call records and call events: the tracker the core feeds (sans-IO), the record's fields, and
the shell's outputs (Redis Stream with a local spool, per-tenant HTTP push, commands)."""
