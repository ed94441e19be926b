"""ETL pipelines: raw unstructured files -> versioned Petastorm Parquet datasets."""
