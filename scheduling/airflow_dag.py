"""Airflow DAG: hourly batch inference with the registry's champion.

Copy into your Airflow dags/ folder and set the Airflow Variables `deepspark_home` (the project
checkout with its .venv), `deepspark_master` (e.g. spark://host:7077) and optionally
`deepspark_args` (the job's key=value overrides, e.g. input.path=... output.path=...). The job itself is
incremental and idempotent, so Airflow retries and backfills never duplicate predictions, and
max_active_runs=1 plus the output lock keep one writer at a time.
"""

from datetime import datetime, timedelta

from airflow import DAG

try:  # Airflow 3
    from airflow.providers.standard.operators.bash import BashOperator
except ImportError:  # Airflow 2
    from airflow.operators.bash import BashOperator

with DAG(
    dag_id="deepspark_batch_inference",
    schedule="@hourly",
    start_date=datetime(2026, 11, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=10)},
    tags=["deepspark", "inference"],
) as dag:
    BashOperator(
        task_id="batch_inference",
        bash_command=(
            "cd {{ var.value.deepspark_home }} && "
            "PYSPARK_PYTHON={{ var.value.deepspark_home }}/.venv/bin/python "
            ".venv/bin/spark-submit --master {{ var.value.deepspark_master }} jobs/batch_inference.py "
            "{{ var.value.get('deepspark_args', 'input.path=/data/incoming output.path=/data/predictions/fashion-mnist') }}"
        ),
    )
