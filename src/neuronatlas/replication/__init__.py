"""The replication report: every headline claim of the five papers, measured with its interval, and a verdict."""
