# DeepSpark: `make demo` and `make test` set everything up themselves (scripts/setup.sh).
VENV   := .venv
PY     := $(VENV)/bin/python
export SPARK_LOCAL_IP := 127.0.0.1
export PYSPARK_PYTHON := $(abspath $(VENV)/bin/python)
export PYSPARK_DRIVER_PYTHON := $(abspath $(VENV)/bin/python)
export TF_CPP_MIN_LOG_LEVEL := 2
UI_PORT ?= 5000
SUBMIT := $(VENV)/bin/spark-submit --master local[2] --driver-java-options "-Dlog4j2.configurationFile=file:$(abspath conf/log4j2.properties)"

.PHONY: setup setup-test demo demo-text demo-audio demo-select demo-transfer infer test test-fast lint mutants ui bench dist clean

setup:
	@bash scripts/setup.sh

setup-test:     ## the demo's set-up plus what only the tests need (a real Airflow in its own venv, Chromium, an S3 server and Spark's S3 connector)
	@bash scripts/setup.sh --with-airflow --with-browser --with-cluster

demo: setup
	$(PY) jobs/demo_data.py
	$(SUBMIT) jobs/etl.py
	$(SUBMIT) jobs/train.py
	$(SUBMIT) jobs/batch_inference.py
	@$(PY) jobs/demo_summary.py

# The same four jobs for text and audio: a profile switches the modality, data and model keys.
demo-text demo-audio: demo-%: setup
	$(PY) jobs/demo_data.py --profile $*
	$(SUBMIT) jobs/etl.py --profile $*
	$(SUBMIT) jobs/train.py --profile $*
	$(SUBMIT) jobs/batch_inference.py --profile $*
	@$(PY) jobs/demo_summary.py $*

# A small search on Fashion-MNIST (conf/base/select_models.yaml): model hopper parallelism, the
# leaderboard printed, the winner registered; the dataset is written once (make demo's, if there).
demo-select: setup
	$(PY) jobs/demo_data.py
	@test -f data/datasets/fashion-mnist/_LATEST -o -d data/datasets/fashion-mnist/v=1 || $(SUBMIT) jobs/etl.py
	$(SUBMIT) jobs/select_models.py

# Transfer learning (jobs/demo_transfer.py): a backbone trained on five Fashion-MNIST classes,
# the other five learned three ways (feature transfer, fine-tuning, from scratch) in one session.
demo-transfer: setup
	$(PY) jobs/demo_data.py --profile transfer
	$(SUBMIT) jobs/demo_transfer.py

infer: setup
	$(SUBMIT) jobs/batch_inference.py

test: setup-test
	$(PY) -m pytest

test-fast: setup-test
	$(PY) -m pytest -m "not slow"

lint: setup     ## ruff (pyflakes, pycodestyle, import order, bugbear, no print) and mypy, as .ci/run does
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# The guarantee table's mutation check (tests/guarantees.yaml): each guarantee's code removed in a
# scratch copy, only its tests run, KILLED or SURVIVED printed. A development tool, not part of
# `make test`; e.g. make mutants MUTANTS="--only lock-heartbeat,etl-latest-pointer".
mutants: setup
	$(PY) scripts/mutants.py $(MUTANTS)

ui: setup       ## the MLflow UI on loopback; prints the URL of the experiment's training runs
	$(PY) -m deepspark.ui --host 127.0.0.1 --port $(UI_PORT)

bench: setup
	$(PY) benchmarks/etl_images.py --quick
	$(PY) benchmarks/training.py --quick
	$(PY) benchmarks/inference.py --quick
	$(PY) benchmarks/modalities.py --quick
	$(PY) benchmarks/model_selection.py --quick
	$(PY) benchmarks/fixed_costs.py --quick

dist: setup    ## dist/deepspark.zip for --py-files, dist/conf.zip for --archives (README: Run on a cluster)
	$(PY) -m deepspark.packaging dist

clean:
	rm -rf data spark-warehouse dist
