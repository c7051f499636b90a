# Object verifiers for SENTINEL (placeholder until the rule lands).
