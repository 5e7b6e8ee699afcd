"""trialwatch: real-time safety monitoring for trial NCT06592612."""

__version__ = "0.1.0"
