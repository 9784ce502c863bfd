"""Scheduling policy as plain code: the request queue, admission against the KV-cache budget,
departures and the prefix-cache index. No Trio, no threads: ``actors.scheduler`` drives it."""
