"""Anti-fraud call policy, evaluated at each initial INVITE once its binding is found.

Sans-IO parts (`spec`, `windows`, `blocklist`, `engine`): configuration compiled for the hot
path, time windows with the clock passed in, blocklist matching, and the decision from what the
shell fetched. Shell parts (`redis_counters`, `blocklist_sync`, `webhook`, `runner`): the Redis
round trip for caps, concurrency and bulk detection, the blocklist kept in sync from Redis, the
tenant's decision webhook, and the glue the worker uses (core.policy_checks → complete_policy).
"""
