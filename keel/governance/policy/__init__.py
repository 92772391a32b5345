"""The policy: which data may go to which deployment, which guards run, what goes to human review."""
