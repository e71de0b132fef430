"""The OUTPUT store: the ledger, the lease, ownership, changed rows, the committed images, verify, packing,
run records and the report: everything that reads or writes an OUTPUT (its names: schemas/layout.py)."""
