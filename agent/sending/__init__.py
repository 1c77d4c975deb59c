"""Sending: the Marketplace Metering API's client (the only boto3 user) and what its answers mean,
the send policy (when, retry, backoff, expiry), the send pass both modes share, SaaS batches,
RegisterUsage at start, and health.json (what the seller's product reads)."""
