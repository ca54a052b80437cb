"""What the people who run the host see: counters, metrics, the audit trail's events, the journal."""
