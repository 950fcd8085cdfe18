"""Study assembly and the scoring worker: from spooled instances to results in the outbox."""
