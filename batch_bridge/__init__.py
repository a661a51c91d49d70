"""batch_bridge: dbt + DuckDB rows enriched through Anthropic's Message Batches API."""

__version__ = "0.1.0"
