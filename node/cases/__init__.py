"""The node's own cases: de-identified export and retraining on them."""
