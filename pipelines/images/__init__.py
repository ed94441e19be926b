"""Image ETL: transforms (pure), layout (paths -> labels/splits), etl (Spark I/O)."""
