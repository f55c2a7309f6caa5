"""Device trust on the gateway side: registry, enrolment, posture intake, binding (issue #6)."""
