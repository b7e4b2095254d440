"""The reference model of qcow2: clarity, not speed. Not built yet (see the model issue)."""
