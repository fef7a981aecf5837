"""Probes of the local engine. Observations only: no lease decisions here."""
