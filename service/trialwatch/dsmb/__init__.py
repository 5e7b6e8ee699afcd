"""DSMB delivery: the alert books, the API and page, acknowledgements and webhook notifications."""
