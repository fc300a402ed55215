"""Ingestion edges: readers that turn files, directories of them and streams into messages for the engine."""

from idstitch.ingest.files import Batch, InputFile, Item, batched, read_batches, read_groups, read_items

__all__ = ["Batch", "InputFile", "Item", "batched", "read_batches", "read_groups", "read_items"]
