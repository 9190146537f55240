"""The spool as its own floor: ingest writes, the pipeline reads, retention purges."""
