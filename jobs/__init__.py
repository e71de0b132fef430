"""Job entrypoints built on the pipeline: the CLI, the demo, and (later) dataset and catalog jobs."""
