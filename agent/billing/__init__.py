"""Billing: an hour's samples become sealed records, once: the allocations (UsageAllocations) and
sealing, per (dimension, hour) in instance mode, per (customer, dimension, hour) in SaaS mode."""
