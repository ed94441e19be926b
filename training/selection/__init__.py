"""Model selection: many configurations of one model family trained at once on Spark, by model
hopper parallelism (`mop`), task parallelism (`task`) or one Horovod job at a time (`horovod`),
all tracked as one MLflow parent run with a child run per configuration."""
